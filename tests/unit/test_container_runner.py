"""scripts/normsoftmax-container: the command line docker or podman receives, checked with stand-in
executables on PATH (no container engine runs here)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "scripts" / "normsoftmax-container"
STAND_IN = """#!/bin/sh
# records its arguments, one per line; "info" prints the runtimes it was told to have
if [ "$1" = info ]; then echo "${{FAKE_RUNTIMES:-}}"; exit 0; fi
printf '%s\\n' "$@" > "{record}"
"""


def _run(tmp_path, engines, *args, env=None, gpu=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for engine in engines:
        (bin_dir / engine).write_text(STAND_IN.format(record=tmp_path / f"{engine}.args"))
        (bin_dir / engine).chmod(0o755)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    work = tmp_path / "project"
    work.mkdir(exist_ok=True)
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})}
    done = subprocess.run(["bash", str(RUNNER), *args], cwd=work, env=environment, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    engine = next(e for e in engines if (tmp_path / f"{e}.args").exists())
    received = (tmp_path / f"{engine}.args").read_text().splitlines()
    return engine, received, done.stderr, work


def test_docker_gets_the_mounts_the_user_and_the_command(tmp_path):
    engine, argv, printed, work = _run(tmp_path, ["docker", "podman"], "train", "--dataset", "Cub200",
                                       env={"NORMSOFTMAX_DATA": str(tmp_path / "datasets")})
    assert engine == "docker"  # both installed: docker
    assert argv[:3] == ["run", "--rm", "-i"]
    assert "-v" in argv and f"{work}:/work" in argv and f"{tmp_path / 'datasets'}:/data" in argv
    assert f"{tmp_path / '.cache' / 'normsoftmax-container'}:/cache" in argv
    assert argv[argv.index("-w") + 1] == "/work" and argv[argv.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    assert "--gpus" not in argv  # no GPU runtime here
    assert argv[-4:] == ["normsoftmax:gpu", "train", "--dataset", "Cub200"]
    assert printed.startswith("+ docker run --rm -i") and "normsoftmax:gpu train --dataset Cub200" in printed
    assert (tmp_path / "datasets").is_dir()


def test_docker_adds_the_gpus_where_a_gpu_runtime_exists(tmp_path):
    _, argv, _, _ = _run(tmp_path, ["docker"], "evaluate", "runs/x", gpu=True)
    assert argv[argv.index("--gpus") + 1] == "all"
    _, argv, _, _ = _run(tmp_path, ["docker"], "evaluate", "runs/x",
                         env={"FAKE_RUNTIMES": '{"nvidia":{"path":"nvidia-container-runtime"}}'})
    assert "--gpus" in argv


def test_podman_gets_keep_id_and_the_cdi_device(tmp_path):
    spec = tmp_path / "nvidia.yaml"
    spec.write_text("cdiVersion: 0.5.0\n")
    engine, argv, printed, _ = _run(tmp_path, ["podman"], "demo", env={"NORMSOFTMAX_CDI_SPEC": str(spec),
                                                                        "NORMSOFTMAX_IMAGE": "normsoftmax:cpu"})
    assert engine == "podman" and "--userns=keep-id" in argv and "--user" not in argv
    assert argv[argv.index("--device") + 1] == "nvidia.com/gpu=all"
    assert argv[-2:] == ["normsoftmax:cpu", "demo"] and printed.startswith("+ podman run")


def test_serve_is_published_on_loopback_and_exec_runs_any_command(tmp_path):
    _, argv, _, _ = _run(tmp_path, ["docker"], "serve", "runs/x", "index", env={"NORMSOFTMAX_PORT": "9000"})
    assert argv[argv.index("-p") + 1] == "127.0.0.1:9000:8000"
    assert argv[-8:] == ["normsoftmax:gpu", "serve", "runs/x", "index", "--host", "0.0.0.0", "--port", "8000"]
    _, argv, _, _ = _run(tmp_path, ["docker"], "--exec", "python", "-c", "print(1)")
    assert argv[argv.index("--entrypoint") + 1] == "python" and argv[-3:] == ["normsoftmax:gpu", "-c", "print(1)"]


def test_without_an_engine_it_says_so(tmp_path):
    bin_dir = tmp_path / "empty"
    bin_dir.mkdir()
    done = subprocess.run(["bash", str(RUNNER), "--help"], env={"PATH": f"{bin_dir}:/usr/bin:/bin",
                                                                 "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    if Path("/usr/bin/docker").exists() or Path("/usr/bin/podman").exists():
        pytest.skip("a real docker or podman is installed in /usr/bin")
    assert done.returncode == 127 and "neither docker nor podman" in done.stderr
