"""Resuming a run: exactly where it stopped, lost evaluations recovered, loose checkpoints refused."""

import json
import shutil

import pytest
import torch

from fixtures import tiny_config, write_cub200
from normsoftmax import TrainConfig, train_embedder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-epoch run (1 warm-up + 3 main, evaluated after epochs 1, 3 and 4), left untouched."""
    base = tmp_path_factory.mktemp("finished")
    root = write_cub200(base / "data")
    train_embedder(tiny_config(root, base / "full", num_steps=3))
    return base / "full"


# From the end of warm-up (a fresh main-phase optimizer) and from mid main phase (momentum restored).
@pytest.mark.parametrize("resume_after", [1, 2])
def test_resume_continues_exactly(tmp_path, finished_run, resume_after):
    copy_dir = tmp_path / "copy"
    shutil.copytree(finished_run, copy_dir)
    for later in range(resume_after + 1, 5):
        (copy_dir / "checkpoints" / f"epoch_{later:03d}.pt").unlink()
    train_embedder(TrainConfig(resume=str(copy_dir / "checkpoints" / f"epoch_{resume_after:03d}.pt"), workers=0,
                               progress=False))
    expected = torch.load(finished_run / "checkpoints" / "epoch_004.pt", weights_only=True)
    resumed = torch.load(copy_dir / "checkpoints" / "epoch_004.pt", weights_only=True)
    for key, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert torch.equal(expected["criterion"]["proxies"], resumed["criterion"]["proxies"])
    for key, value in expected["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"])


def test_resume_evaluates_an_epoch_whose_evaluation_was_lost(tmp_path, finished_run):
    copy_dir = tmp_path / "copy"
    shutil.copytree(finished_run, copy_dir)
    (copy_dir / "eval" / "epoch_003.json").unlink()
    (copy_dir / "checkpoints" / "epoch_004.pt").unlink()
    train_embedder(TrainConfig(resume=str(copy_dir), workers=0, progress=False))
    recovered = json.loads((copy_dir / "eval" / "epoch_003.json").read_text())
    assert recovered == json.loads((finished_run / "eval" / "epoch_003.json").read_text())
    final_metrics = json.loads((finished_run / "final_metrics.json").read_text())
    assert json.loads((copy_dir / "final_metrics.json").read_text()) == final_metrics


def test_resume_refuses_a_checkpoint_outside_its_run(tmp_path, finished_run, cli):
    loose = tmp_path / "loose.pt"
    shutil.copy(finished_run / "checkpoints" / "epoch_002.pt", loose)
    code, _, err = cli("train", "--resume", loose, "--workers", "0")
    assert code == 2 and "inside its run directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loose.pt"]
