"""Never losing a run: crashes at three points, pre-emption, corrupt checkpoints, NaN, bad images, a full disk.

Crashes are real: a training subprocess SIGKILLs itself at a named point (normsoftmax.faults), then
the same command continues the run; the final weights and metrics must equal an uninterrupted run's.
"""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures import tiny_config, write_cub200
from normsoftmax import TrainConfig, train_embedder
from normsoftmax.data.records import DatasetError
from normsoftmax.files import NotEnoughSpaceError

# 16 training images in batches of 4: 4 steps an epoch, 1 warm-up + 2 main epochs, evaluated after each.
FLAGS = ["--dataset", "Cub200", "--model_name", "resnet18", "--weights", "none", "--dim", "16", "--batch_size", "4",
         "--images_per_class", "2", "--class_balancing", "--pretrain_epochs", "1", "--epochs_per_step", "1",
         "--num_steps", "2", "--test_every_n_epochs", "1", "--resize", "36", "--crop", "32", "--workers", "0",
         "--no-progress", "--checkpoint_every_minutes", "0", "--log_every", "2", "--amp", "none"]


def train_command(root, run_dir, *extra):
    return [sys.executable, "-m", "normsoftmax", "train", *FLAGS, "--dataset_root", str(root), "--run_dir",
            str(run_dir),
            *extra]


def run(command, failpoint=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NORMSOFTMAX_FAILPOINT", None)
    if failpoint:
        env["NORMSOFTMAX_FAILPOINT"] = failpoint
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cub200(tmp_path_factory.mktemp("faults") / "data", num_classes=8, images_per_class=4)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = run(train_command(data, run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours = torch.load(run_dir / "checkpoints" / "epoch_003.pt", weights_only=True)
    theirs = torch.load(reference / "checkpoints" / "epoch_003.pt", weights_only=True)
    for key, value in theirs["model"].items():
        assert torch.equal(value, ours["model"][key]), key
    assert torch.equal(theirs["criterion"]["proxies"], ours["criterion"]["proxies"])
    assert json.loads((run_dir / "final_metrics.json").read_text()) == \
        json.loads((reference / "final_metrics.json").read_text())
    for epoch in (1, 2, 3):
        assert (run_dir / "eval" / f"epoch_{epoch:03d}.json").exists()


@pytest.mark.parametrize("point", ["step:6", "checkpoint:2", "evaluation:2"])
def test_a_crash_anywhere_loses_nothing(tmp_path, data, uninterrupted, point):
    """SIGKILL mid-epoch, while a checkpoint is being written, during an evaluation; then the same command."""
    run_dir = tmp_path / "run"
    crashed = run(train_command(data, run_dir), failpoint=point)
    assert crashed.returncode == -signal.SIGKILL
    assert not (run_dir / "final_metrics.json").exists()
    resumed = run(train_command(data, run_dir))  # the same command again continues the unfinished run
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing the unfinished run" in (run_dir / "train.log").read_text()
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # the interrupted write left nothing behind
    assert_same_run(run_dir, uninterrupted)


def test_sigterm_checkpoints_mid_epoch_and_the_resumed_run_is_identical(tmp_path, data, uninterrupted):
    run_dir = tmp_path / "run"
    stopped = run(train_command(data, run_dir), failpoint="step:6:SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert f"normsoftmax train --resume {run_dir}" in stopped.stderr
    # 6 steps done: epoch 1 (4 steps) complete, 2 steps into epoch 2
    assert (run_dir / "checkpoints" / "epoch_001_step_000002.pt").exists()
    resumed = run([sys.executable, "-m", "normsoftmax", "train", "--resume", str(run_dir), "--workers", "0",
                   "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(run_dir, uninterrupted)
    assert not (run_dir / "checkpoints" / "epoch_001_step_000002.pt").exists()  # superseded, removed


def test_resume_auto_refuses_other_settings_and_names_them(tmp_path, data):
    run_dir = tmp_path / "run"
    assert run(train_command(data, run_dir), failpoint="step:6").returncode == -signal.SIGKILL
    other = run(train_command(data, run_dir, "--lr", "0.5", "--resume", "auto"))
    assert other.returncode == 2 and "lr (0.01 there, 0.5 now)" in other.stderr and "Traceback" not in other.stderr


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "final_metrics.json").unlink()
    newest = run_dir / "checkpoints" / "epoch_003.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    with caplog.at_level(logging.WARNING, logger="normsoftmax"):
        train_embedder(TrainConfig(resume=str(run_dir), workers=0, progress=False))
    warning = next(r.getMessage() for r in caplog.records if "skipping the unusable checkpoint" in r.getMessage())
    assert "epoch_003.pt" in warning and "epoch_002.pt" in warning
    assert_same_run(run_dir, uninterrupted)


def _tiny(root, run_dir, **extra):
    return tiny_config(root, run_dir, batch_size=4, checkpoint_every_minutes=0, log_every=1, **extra)


def test_a_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    from normsoftmax.loss import NormSoftmaxLoss

    real, calls = NormSoftmaxLoss.forward, []

    def poisoned(self, embeddings, labels):
        calls.append(1)
        loss = real(self, embeddings, labels)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(NormSoftmaxLoss, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="between steps 2 and 2"):
        train_embedder(_tiny(data, tmp_path / "run"))
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("epoch_*.pt"))
    assert files == ["epoch_001.pt"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "epoch_001.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_an_image_that_breaks_after_verification(tmp_path, data, monkeypatch, policy):
    import normsoftmax.training.recipe as recipe

    root = tmp_path / "data"
    shutil.copytree(data, root)
    victim = sorted((root / "images").glob("001.*/*.jpg"))[0]  # class 1: in the training half
    real = recipe.verify_images

    def verify_then_break(paths, **kwargs):
        real(paths, **kwargs)
        victim.write_bytes(victim.read_bytes()[:100])  # truncated after the check, as a flaky mount would

    monkeypatch.setattr(recipe, "verify_images", verify_then_break)
    config = _tiny(root, tmp_path / "run", on_bad_image=policy)
    if policy == "error":
        with pytest.raises(DatasetError, match=str(victim)):
            train_embedder(config)
        return
    summary = train_embedder(config)
    skipped = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    assert skipped and set(skipped) == {str(victim)}
    assert summary["last"]["skipped_images"] == len(skipped)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_images"] == len(skipped)


def test_a_full_disk_leaves_the_previous_checkpoint_loadable(tmp_path, data, monkeypatch):
    import normsoftmax.checkpoint as checkpoint

    real, calls = torch.save, []

    def full_disk(state, file, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            with open(file, "wb") as handle:
                handle.write(b"\0" * 1000)  # part of the file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, file, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(NotEnoughSpaceError, match=r"disk is full.*needs about \d+ MiB"):
        train_embedder(_tiny(data, tmp_path / "run"))
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.glob("epoch_*.pt")) == ["epoch_001.pt"]
    assert not list(folder.glob(".*.tmp"))
    assert checkpoint.load_checkpoint(folder / "epoch_001.pt")["epoch"] == 1


def test_keep_checkpoints_keeps_the_best_besides_the_newest(tmp_path, data):
    train_embedder(_tiny(data, tmp_path / "run", keep_checkpoints=1, num_steps=3, test_every_n_epochs=1))
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.glob("epoch_*.pt")) == ["epoch_004.pt"]
    best = json.loads((folder / "best.json").read_text())
    recalls = {json.loads(line)["epoch"]: json.loads(line)["float"]["recall@1"]
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()}
    assert best["recall@1"] == max(recalls.values()) and recalls[best["epoch"]] == best["recall@1"]
    assert torch.load(folder / "best.pt", weights_only=True)["epoch"] == best["epoch"]


def test_a_run_stopped_after_its_last_evaluation_gets_its_final_metrics(tmp_path, data, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "final_metrics.json").unlink()  # crashed between the last evaluation and this file
    done = run(train_command(data, run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "final_metrics.json").read_text()) == \
        json.loads((uninterrupted / "final_metrics.json").read_text())
    assert not (tmp_path / "run-2").exists()


def test_resume_auto_finds_the_run_of_these_settings_among_its_siblings(tmp_path, data):
    base = tmp_path / "run"
    first = train_embedder(_tiny(data, base, num_steps=0))  # finished: lr 0.01
    assert first["run_dir"] == str(base)
    # other settings, interrupted in the sibling folder
    crashed = run(train_command(data, base, "--lr", "0.02"), failpoint="step:6")
    assert crashed.returncode == -signal.SIGKILL and (tmp_path / "run-2" / "config.json").exists()
    resumed = run(train_command(data, base, "--lr", "0.02", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "run-2" / "final_metrics.json").exists() and not (tmp_path / "run-3").exists()
    assert "continuing the unfinished run" in (tmp_path / "run-2" / "train.log").read_text()


def test_torchrun_resumes_from_an_epoch_checkpoint(tmp_path, data):
    """Every rank must take the same path through the lost-evaluation check (a collective on some ranks only hangs)."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "normsoftmax", "train",
                *FLAGS, "--dataset_root", str(data), "--run_dir", str(tmp_path / "run")]
    crashed = run(torchrun, failpoint="step:6")
    assert crashed.returncode != 0 and (tmp_path / "run" / "checkpoints" / "epoch_001.pt").exists()
    resumed = run(torchrun, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "run" / "final_metrics.json").exists()
