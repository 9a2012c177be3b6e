"""End to end through the command line: a few training steps, then evaluation, on every fixture format."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import WRITERS, write_cub200
from test_download import ArchiveServer
from test_prepare import archives  # noqa: F401  (the fixture: archives in each official layout)

from normsoftmax import TrainConfig, train

TINY = ["--model_name", "resnet18", "--weights", "none", "--dim", "32", "--batch_size", "8", "--images_per_class", "2",
        "--epochs_per_step", "1", "--num_steps", "1", "--pretrain_epochs", "1", "--resize", "40", "--crop", "32",
        "--workers", "0", "--no-progress"]

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
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_001.pt", "epoch_002.pt"]
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


def tiny_config(root, run_dir, **extra):
    values = dict(dataset="Cub200", dataset_root=str(root), run_dir=str(run_dir) if run_dir else None, model_name="resnet18", weights="none",
                  dim=16, batch_size=8, images_per_class=2, class_balancing=True, pretrain_epochs=1, epochs_per_step=1,
                  num_steps=2, test_every_n_epochs=2, resize=36, crop=32, workers=0, progress=False, lr=0.01)
    values.update(extra)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-epoch run (1 warm-up + 3 main, evaluated after epochs 1, 3 and 4), left untouched."""
    base = tmp_path_factory.mktemp("finished")
    root = write_cub200(base / "data")
    train(tiny_config(root, base / "full", num_steps=3))
    return base / "full"


# From the end of warm-up (a fresh main-phase optimizer) and from mid main phase (momentum restored).
@pytest.mark.parametrize("resume_after", [1, 2])
def test_resume_continues_exactly(tmp_path, finished_run, resume_after):
    copy_dir = tmp_path / "copy"
    shutil.copytree(finished_run, copy_dir)
    for later in range(resume_after + 1, 5):
        (copy_dir / "checkpoints" / f"epoch_{later:03d}.pt").unlink()
    train(TrainConfig(resume=str(copy_dir / "checkpoints" / f"epoch_{resume_after:03d}.pt"), workers=0, progress=False))
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
    train(TrainConfig(resume=str(copy_dir), workers=0, progress=False))
    recovered = json.loads((copy_dir / "eval" / "epoch_003.json").read_text())
    assert recovered == json.loads((finished_run / "eval" / "epoch_003.json").read_text())
    assert json.loads((copy_dir / "final_metrics.json").read_text()) == json.loads((finished_run / "final_metrics.json").read_text())


def test_resume_refuses_a_checkpoint_outside_its_run(tmp_path, finished_run, cli):
    loose = tmp_path / "loose.pt"
    shutil.copy(finished_run / "checkpoints" / "epoch_002.pt", loose)
    code, _, err = cli("train", "--resume", loose, "--workers", "0")
    assert code == 2 and "inside its run directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loose.pt"]


def test_unreadable_checkpoint_and_mismatched_weights_are_clear_errors(tmp_path, cli):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    code, _, err = cli("evaluate", tmp_path / "garbage.pt")
    assert code == 2 and "garbage.pt: cannot be read" in err and "Traceback" not in err
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    from normsoftmax import create_embedder

    with pytest.raises(ValueError, match="r18.pth: does not fit resnet50"):
        create_embedder("resnet50", dim=8, weights=str(tmp_path / "r18.pth"))


def test_negative_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_steps_per_epoch"):
        train(tiny_config(tmp_path, tmp_path / "run", max_steps_per_epoch=-1))


def test_existing_run_directory_is_never_overwritten(tmp_path):
    root = write_cub200(tmp_path / "data")
    config = tiny_config(root, None, output=str(tmp_path / "runs"), num_steps=0, pretrain_epochs=1)
    first = train(config)["run_dir"]
    second = train(config)["run_dir"]
    assert first != second and Path(second).name.endswith("-2")
    assert Path(first, "checkpoints", "epoch_001.pt").exists() and Path(second, "checkpoints", "epoch_001.pt").exists()


def test_console_entry_points():
    for command in ([sys.executable, "-m", "normsoftmax", "--help"], [str(Path(sys.executable).parent / "normsoftmax"), "train", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "normsoftmax" in result.stdout


def test_distributed_data_parallel_under_torchrun(tmp_path):
    root = write_cub200(tmp_path / "data", num_classes=8, images_per_class=4)
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc_per_node", "2", "-m", "normsoftmax", "train", "--dataset", "Cub200",
               "--dataset_root", str(root), "--run_dir", str(tmp_path / "run"), "--class_balancing", *TINY]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1  # rank 0 alone reports and writes
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("epoch 2/2 (main)") == 1
    assert (tmp_path / "run" / "checkpoints" / "epoch_002.pt").exists()



@pytest.mark.parametrize("dataset, how", [("cub200", "url"), ("cars196", "archive"), ("sop", "url"), ("inshop", "archive")])
def test_prepare_from_a_server_or_archives_then_train(tmp_path, cli, archives, dataset, how):  # noqa: F811
    server = ArchiveServer()
    try:
        files = {"cub200": [archives["cub"]], "cars196": [archives["cars_images"], archives["cars_annos"]],
                 "sop": [archives["sop"]], "inshop": [archives["inshop_images"], archives["inshop_list"]]}[dataset]
        if how == "url":
            source = [arg for f in files for arg in ("--url", server.add(f.name, f.read_bytes()))]
        else:
            source = ["--from-archive", *files]
        root = tmp_path / dataset
        extra = ["--cache"] if dataset == "cub200" else []
        code, out, err = cli("prepare", dataset, "--root", root, *source, *extra, "--workers", "1", "--no-progress")
        assert code == 0, err
        if how == "url":
            assert "unverified" in err  # a custom URL without --sha256
        manifest = json.loads((root / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["ok"]
        assert f"--dataset_root {manifest['dataset_root']}" in out
        code, out, err = cli("prepare", "--check", root, "--workers", "1", "--no-progress")
        assert code == 0, err

        name = {"cub200": "Cub200", "cars196": "Cars196", "sop": "StanfordOnlineProducts", "inshop": "InShop"}[dataset]
        run_dir = tmp_path / "run"
        code, out, err = cli("train", "--dataset", name, "--dataset_root", manifest["dataset_root"], "--run_dir", run_dir,
                             "--class_balancing", *TINY, "--resize", "256", "--crop", "224")
        assert code == 0, err
        log = (run_dir / "train.log").read_text()
        assert ("pre-resized cache" in log) == (dataset == "cub200")
        assert (run_dir / "eval" / "epoch_002.json").exists()
    finally:
        server.close()


def test_recipes_match_the_reference_commands_and_yield_to_explicit_values():
    config = TrainConfig.from_recipe("cub200", dataset_root="somewhere", lr=0.5)
    assert (config.dataset, config.dim, config.model_name, config.epochs_per_step, config.num_steps) == ("Cub200", 2048, "resnet50", 15, 2)
    assert (config.test_every_n_epochs, config.images_per_class, config.batch_size, config.class_balancing) == (5, 25, 75, True)
    assert config.lr == 0.5 and config.dataset_root == "somewhere"
    assert TrainConfig.from_recipe("sop").images_per_class == 5 and TrainConfig.from_recipe("cars196").lr == 0.01
    assert TrainConfig().batch_size == 64 and TrainConfig().class_balancing is False  # the reference script's defaults


def test_readme_reproduction_commands_parse_to_the_recipes():
    from normsoftmax.cli import build_parser
    from normsoftmax.config import apply_recipe

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = [line.split()[1:] for line in readme.splitlines() if line.startswith("normsoftmax train --dataset ")]
    assert len(commands) == 4
    recipes = {"Cub200": "cub200", "Cars196": "cars196", "StanfordOnlineProducts": "sop", "InShop": "inshop"}
    for argv in commands:
        args = build_parser().parse_args(argv)
        explicit = {k: v for k, v in vars(args).items() if k not in ("handler", "command") and v is not None}
        config = apply_recipe(TrainConfig(), explicit)
        assert dataclasses.replace(config, recipe=recipes[config.dataset]) == TrainConfig.from_recipe(recipes[config.dataset])
