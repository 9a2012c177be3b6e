"""``normsoftmax export``: the exported embedder must give PyTorch's embeddings (checked here independently, in
onnxruntime and in a reloaded TorchScript file, on a batch size the export never saw), carry its metadata, and
refuse bad input or a mismatching export without leaving a file behind."""

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normsoftmax.checkpoint import find_checkpoint, load_embedder
from normsoftmax.cli import main
from normsoftmax.config import TrainConfig
from normsoftmax.export import (
    METADATA_FILE,
    ExportError,
    check_out_path,
    default_out_path,
    export_module,
    sample_images,
)

TOLERANCE = 1e-4
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")
VERIFY_BATCH = 5  # neither the export's example batch (2 or 3) nor its own check batch (4 by default)


@pytest.fixture(scope="module")
def run_copy(trained_run, tmp_path_factory):
    """The finished run's newest checkpoint in a run directory of our own, so default outputs land here."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    newest = find_checkpoint(trained_run[0])
    shutil.copy2(newest, run_dir / "checkpoints" / newest.name)
    return run_dir


@pytest.fixture(scope="module")
def onnx_export(run_copy):
    """``normsoftmax export RUN_DIR`` on the command line (ONNX, default --out): (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["export", str(run_copy)])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def reference(run_copy, trained_run):
    """The PyTorch embedder and VERIFY_BATCH of the dataset's images in the run's evaluation transform."""
    from PIL import Image
    from torchvision import transforms

    model = load_embedder(run_copy, "cpu")
    crop, resize = model.train_config.crop, model.train_config.resize
    transform = transforms.Compose([transforms.Resize((resize, resize)), transforms.CenterCrop(crop),
                                    transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    files = sorted(path for path in Path(trained_run[1]).rglob("*") if path.suffix.lower() in (".jpg", ".png"))
    assert len(files) >= VERIFY_BATCH
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path in files[-VERIFY_BATCH:]])
    with torch.no_grad():
        expected = model(images).numpy()
    return model, images, expected


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------------- ONNX
def test_onnx_export_runs_in_onnxruntime_with_pytorch_embeddings(onnx_export, run_copy, reference):
    import onnx
    import onnxruntime

    code, stdout, stderr = onnx_export
    assert code == 0, stderr
    path = run_copy / "embedder.onnx"
    assert str(path) in stdout and "max absolute difference" in stdout
    onnx.checker.check_model(str(path), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert isinstance(model_input.shape[0], str), "the batch dimension must be dynamic"
    assert model_input.shape[1:] == [3, 32, 32]
    _, images, expected = reference
    for batch in (images, images[:1]):
        embeddings = session.run(None, {model_input.name: batch.numpy()})[0]
        assert embeddings.shape == (len(batch), 16) and embeddings.dtype == np.float32
        assert np.abs(embeddings - expected[:len(batch)]).max() <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert leftovers(run_copy) == []


def test_onnx_metadata_describes_the_model(onnx_export, run_copy, reference):
    import onnx

    assert onnx_export[0] == 0, onnx_export[2]
    metadata = {entry.key: entry.value for entry in onnx.load(str(run_copy / "embedder.onnx")).metadata_props}
    model = reference[0]
    assert metadata["model_digest"] == model.digest
    assert (metadata["backbone"], metadata["dim"], metadata["input_size"]) == ("resnet18", "16", "32")
    assert json.loads(metadata["mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(metadata["std"]) == [0.229, 0.224, 0.225]
    assert metadata["output_l2_normalized"] == "true"
    assert metadata["exporter"].startswith("torch.onnx.export(dynamo=True)")


# ------------------------------------------------------------------------------------------------ TorchScript
def test_torchscript_export_reloads_and_matches(cli, run_copy, reference, tmp_path):
    out = tmp_path / "models" / "embedder.pt"
    code, stdout, stderr = cli("export", run_copy, "--format", "torchscript", "--out", out, "--check_batch", 3)
    assert code == 0, stderr
    assert str(out) in stdout and "on 3 images" in stdout
    extra = {METADATA_FILE: ""}
    loaded = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    model, images, expected = reference
    with torch.no_grad():
        embeddings = loaded(images).numpy()
    assert embeddings.shape == expected.shape
    assert np.abs(embeddings - expected).max() <= TOLERANCE
    metadata = json.loads(extra[METADATA_FILE])
    assert metadata["model_digest"] == model.digest and metadata["dim"] == "16"
    assert leftovers(out.parent) == []


# ------------------------------------------------------------------------------------------------- refusals
class BatchDependent(torch.nn.Module):
    """Embeds differently when the batch holds 2 images: tracing at batch 2 bakes that branch in."""

    def forward(self, images):
        pooled = images.mean(dim=(2, 3))
        if images.shape[0] == 2:
            return F.normalize(pooled, dim=1)
        return F.normalize(-pooled, dim=1)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the point of this model
@pytest.mark.parametrize("format, name", [("torchscript", "model.pt"), ("onnx", "model.onnx")])
def test_refuses_an_export_that_differs_and_keeps_the_previous_file(tmp_path, caplog, format, name):
    out = tmp_path / name
    out.write_bytes(b"previous")
    images = torch.randn(4, 3, 8, 8)
    with pytest.raises(ExportError, match="differs from PyTorch") as raised:
        export_module(BatchDependent(), format, out, check_images=images, metadata={"dim": "3"})
    assert str(raised.value).startswith(f"{out}: not written: ")
    assert out.read_bytes() == b"previous" and leftovers(tmp_path) == []
    if format == "onnx":  # torch.export pins the batch at 2 here: the TorchScript-based exporter is the fallback
        assert "falling back to the TorchScript-based exporter" in caplog.text


def test_unknown_checkpoint_is_a_clear_error(cli, tmp_path):
    missing = tmp_path / "no_such_run"
    code, _, stderr = cli("export", missing)
    assert code == 2 and str(missing) in stderr and "Traceback" not in stderr
    empty = tmp_path / "empty_run"
    empty.mkdir()
    code, _, stderr = cli("export", empty)
    assert code == 2 and str(empty) in stderr and "checkpoints/epoch_*.pt" in stderr


def test_a_file_that_is_no_checkpoint_is_a_clear_error(cli, tmp_path):
    bogus = tmp_path / "notes.pt"
    bogus.write_text("not a checkpoint")
    code, _, stderr = cli("export", bogus, "--out", tmp_path / "out.onnx")
    assert code == 2 and str(bogus) in stderr and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("case", ["folder", "under_a_file", "foreign_suffix", "the_checkpoint", "check_batch"])
def test_odd_out_paths_and_options_are_refused_before_exporting(cli, run_copy, tmp_path, case):
    checkpoint = find_checkpoint(run_copy)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    args = {"folder": ["--out", tmp_path],
            "under_a_file": ["--out", a_file / "embedder.onnx"],
            "foreign_suffix": ["--format", "torchscript", "--out", tmp_path / "embedder.onnx"],
            "the_checkpoint": ["--format", "torchscript", "--out", checkpoint],
            "check_batch": ["--check_batch", 0, "--out", tmp_path / "embedder.onnx"]}[case]
    before = sorted(tmp_path.iterdir())
    size = checkpoint.stat().st_size
    code, _, stderr = cli("export", run_copy, *args)
    assert code == 2 and "Traceback" not in stderr
    named = {"folder": str(tmp_path), "under_a_file": str(a_file), "foreign_suffix": ".onnx",
             "the_checkpoint": str(checkpoint), "check_batch": "check_batch"}[case]
    assert named in stderr
    assert sorted(tmp_path.iterdir()) == before and checkpoint.stat().st_size == size


def test_unwritable_folder_is_a_clear_error(cli, run_copy, tmp_path, monkeypatch):
    # os.access is what the check asks; patched, so that the test also means something when run as root
    monkeypatch.setattr("normsoftmax.export.os.access", lambda path, mode: Path(path) != tmp_path)
    code, _, stderr = cli("export", run_copy, "--out", tmp_path / "embedder.onnx")
    assert code == 2 and f"no write permission in {tmp_path}" in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="no write permission"):
            check_out_path(locked / "embedder.onnx", "onnx")
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------------------------------- helpers
def test_default_out_is_beside_the_checkpoints_folder(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_003.pt"
    assert default_out_path(checkpoint, "onnx") == tmp_path / "run" / "embedder.onnx"
    assert default_out_path(tmp_path / "loose.pt", "torchscript") == tmp_path / "embedder.pt"


def test_random_normalised_images_when_the_dataset_is_not_readable(tmp_path):
    config = TrainConfig(dataset="folder", dataset_root=str(tmp_path / "gone"), crop=24, resize=28)
    images, source = sample_images(config, 3)
    assert images.shape == (3, 3, 24, 24) and "random" in source
    assert images.min() < -1 and images.max() > 1  # normalised, not raw [0, 1] pixels


def test_dataset_images_when_readable(trained_run):
    config = TrainConfig(dataset="folder", dataset_root=str(trained_run[1]), crop=32, resize=36)
    images, source = sample_images(config, 4)
    assert images.shape == (4, 3, 32, 32) and "test split" in source
