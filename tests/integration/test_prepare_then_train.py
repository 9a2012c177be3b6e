"""From archives (served on 127.0.0.1 or given by hand) through `prepare` to `train`, for all four benchmarks."""

import json

import pytest

from archive_server import ArchiveServer
from fixtures import TINY


@pytest.mark.parametrize("dataset, how", [("cub200", "url"), ("cars196", "archive"), ("sop", "url"), ("inshop",
                                                                                                      "archive")])
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
        code, out, err = cli("train", "--dataset", name, "--dataset_root", manifest["dataset_root"], "--run_dir",
                             run_dir,
                             "--class_balancing", *TINY, "--resize", "256", "--crop", "224")
        assert code == 0, err
        log = (run_dir / "train.log").read_text()
        assert ("pre-resized cache" in log) == (dataset == "cub200")
        assert (run_dir / "eval" / "epoch_002.json").exists()
    finally:
        server.close()
