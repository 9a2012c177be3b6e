"""End to end through the command line: a few training steps, then evaluation, on every fixture format."""

import json
from pathlib import Path

import pytest
import torch

from fixtures import TINY, WRITERS, tiny_config, write_cub200
from normsoftmax import train_embedder

RECIPES = {"cub200": "cub200", "cars196": "cars196", "sop": "sop", "inshop": "inshop"}


@pytest.mark.parametrize("dataset", ["cub200", "cars196", "sop", "inshop", "folder"])
def test_train_then_evaluate_on_each_format(tmp_path, cli, dataset):
    root = WRITERS[dataset](tmp_path / "data")
    selection = ["--recipe", RECIPES[dataset]] if dataset in RECIPES else ["--dataset", "folder"]
    run_dir = tmp_path / "run"
    code, out, err = cli("train", *selection, "--dataset_root", root, "--run_dir", run_dir, *TINY)
    assert code == 0, err
    assert f"run directory: {run_dir}" in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model_name"] == "resnet18" and config["dim"] == 32
    if dataset == "cub200":
        assert config["lr"] == 0.001 and config["class_balancing"] is True  # from the recipe
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*.pt")) == ["epoch_001.pt", "epoch_002.pt"]
    assert {p.name for p in (run_dir / "checkpoints").glob("*.sha256")} == {"epoch_001.pt.sha256",
                                                                            "epoch_002.pt.sha256"}
    assert "epoch 2/2 (main)" in (run_dir / "train.log").read_text()
    evaluation = json.loads((run_dir / "eval" / "epoch_002.json").read_text())
    ks = {"sop": [1, 10, 100, 1000], "inshop": [1, 10, 20, 30, 40, 50]}.get(dataset, [1, 2, 4, 8])
    for kind in ("float", "binary"):
        assert set(evaluation[kind]) == {f"recall@{k}" for k in ks} | {"map@r", "r_precision", "nmi"}
        assert 0 <= evaluation[kind]["recall@1"] <= 100
    lines = (run_dir / "eval" / "epoch_002.eval").read_text().splitlines()
    header = ", ".join(f"R@{k}" for k in ks)
    assert lines[0].startswith(f"Raw Features: {header}: ") and lines[1].startswith(f"Binary Features: {header}: ")
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    checkpoint = torch.load(run_dir / "checkpoints" / "epoch_002.pt", weights_only=False)
    assert {"model", "criterion", "optimizer", "scaler", "epoch", "rng", "config"} <= set(checkpoint)

    code, out, err = cli("evaluate", run_dir, "--json", "--workers", "0", "--no-progress",
                         "--save-embeddings", tmp_path / "emb.npz")
    assert code == 0, err
    printed = json.loads(out)
    assert printed["float"] == pytest.approx(evaluation["float"], abs=1e-6)
    assert printed["num_queries"] == evaluation["num_queries"]
    code, out, err = cli("evaluate", "--embeddings", tmp_path / "emb.npz", "--k", ",".join(map(str, ks)), "--json")
    assert code == 0, err
    assert json.loads(out)["float"]["recall@1"] == pytest.approx(evaluation["float"]["recall@1"], abs=1e-6)


def test_corrupt_jpeg_stops_before_training_naming_the_file(tmp_path, cli):
    root = write_cub200(tmp_path / "data")
    victim = next((root / "images").rglob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[:200])
    code, out, err = cli("train", "--recipe", "cub200", "--dataset_root", root, "--run_dir", tmp_path / "run", *TINY)
    assert code == 2
    assert str(victim) in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_flags_give_one_clear_message(tmp_path, cli):
    root = write_cub200(tmp_path / "data")
    code, _, err = cli("train", "--recipe", "cub200", "--dataset_root", root, "--run_dir", tmp_path / "run",
                       *TINY, "--images_per_class", "9")
    assert code == 2 and "images_per_class (9) is larger than batch_size (8)" in err


def test_unreadable_checkpoint_and_mismatched_weights_are_clear_errors(tmp_path, cli):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    code, _, err = cli("evaluate", tmp_path / "garbage.pt")
    assert code == 2 and "garbage.pt: cannot be read" in err and "Traceback" not in err
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    from normsoftmax import create_embedder

    with pytest.raises(ValueError, match="r18.pth: does not fit the resnet50 backbone"):
        create_embedder("resnet50", dim=8, weights=str(tmp_path / "r18.pth"))


def test_negative_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_steps_per_epoch"):
        train_embedder(tiny_config(tmp_path, tmp_path / "run", max_steps_per_epoch=-1))


def test_existing_run_directory_is_never_overwritten(tmp_path):
    root = write_cub200(tmp_path / "data")
    config = tiny_config(root, None, output=str(tmp_path / "runs"), num_steps=0, pretrain_epochs=1)
    first = train_embedder(config)["run_dir"]
    second = train_embedder(config)["run_dir"]
    assert first != second and Path(second).name.endswith("-2")
    assert Path(first, "checkpoints", "epoch_001.pt").exists() and Path(second, "checkpoints", "epoch_001.pt").exists()
