import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from archive_server import ArchiveServer
from fixtures import write_cars196, write_cub200, write_inshop, write_sop

# Two cores: keep each test process to one intra-op thread so xdist workers don't oversubscribe.
torch.set_num_threads(int(os.environ.get("NORMSOFTMAX_TEST_THREADS", "1")))


@pytest.fixture
def cli(capsys):
    """Run the command line in-process; returns (exit code, stdout, stderr)."""
    from normsoftmax.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def replace_dataset_spec(monkeypatch):
    """``replace(name, **fields)``: the registered dataset ``name`` with some spec fields changed, for one test."""
    import dataclasses

    from normsoftmax.data import registry

    def replace(name: str, **changes):
        spec = registry.dataset_spec(name)
        monkeypatch.setitem(registry._REGISTRY, spec.name, dataclasses.replace(spec, **changes))

    return replace


@pytest.fixture
def server():
    instance = ArchiveServer()
    yield instance
    instance.close()


def _tar_folder(archive: Path, base: Path, names: list[str]) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for name in names:
            tar.add(base / name, arcname=name)
    return archive


def _zip_folder(archive: Path, base: Path, folder: str) -> Path:
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted((base / folder).rglob("*")):
            out.write(path, path.relative_to(base).as_posix())
    return archive


@pytest.fixture(scope="session")
def archives(tmp_path_factory) -> dict[str, Path]:
    """The official file names and layouts: CUB_200_2011.tgz, car_ims.tgz + cars_annos.mat,
    Stanford_Online_Products.zip, img.zip + list_eval_partition.txt."""
    source = tmp_path_factory.mktemp("sources")
    out = tmp_path_factory.mktemp("archives")
    write_cub200(source / "cub")
    write_cars196(source / "cars")
    write_sop(source / "sop")
    write_inshop(source / "inshop")
    files = {
        "cub": _tar_folder(out / "CUB_200_2011.tgz", source / "cub", ["CUB_200_2011", "attributes.txt"]),
        "cars_images": _tar_folder(out / "car_ims.tgz", source / "cars", ["car_ims"]),
        "cars_annos": out / "cars_annos.mat",
        "sop": _zip_folder(out / "Stanford_Online_Products.zip", source / "sop", "Stanford_Online_Products"),
        "inshop_images": _zip_folder(out / "img.zip", source / "inshop", "img"),
        "inshop_list": out / "list_eval_partition.txt",
    }
    files["cars_annos"].write_bytes((source / "cars" / "cars_annos.mat").read_bytes())
    files["inshop_list"].write_bytes((source / "inshop" / "Eval" / "list_eval_partition.txt").read_bytes())
    return files


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny finished run on a folder dataset (8 classes x 6 images; the last 4 classes are the test split):
    ``(run_dir, data_root)``. For tests of what comes after training (embed, index, serve, report, export)."""
    from fixtures import tiny_config, write_folder
    from normsoftmax import train_embedder

    base = tmp_path_factory.mktemp("trained")
    root = write_folder(base / "data", num_classes=8, images_per_class=6)
    run_dir = base / "run"
    train_embedder(tiny_config(root, run_dir, dataset="folder", num_steps=1, dim=16))
    return run_dir, root


@pytest.fixture(scope="session")
def search_run(tmp_path_factory):
    """A tiny trained run whose embeddings spread out (dim 64; ``trained_run``'s model, dim 16, maps all its
    images to nearly one point and one sign pattern), its 48 images, and their embeddings file:
    ``(run_dir, data_root, embeddings_file)``. For the index, search, service and page tests."""
    from fixtures import tiny_config, write_folder
    from normsoftmax import train_embedder
    from normsoftmax.config import EmbedConfig
    from normsoftmax.embedding import embed_files

    base = tmp_path_factory.mktemp("search_run")
    root = write_folder(base / "data", num_classes=8, images_per_class=6)
    train_embedder(tiny_config(root, base / "run", dataset="folder", num_steps=1, dim=64, lr=0.01))
    embed_files(EmbedConfig(checkpoint=str(base / "run"), images=str(root), out=str(base / "all.npz"), workers=0,
                            progress=False))
    return base / "run", root, base / "all.npz"


@pytest.fixture(scope="session")
def search_index(search_run, tmp_path_factory):
    """``search_run``'s 48 images in a flat index (float + binary): ``(run_dir, index_dir, embeddings)``."""
    from normsoftmax.config import IndexBuildConfig
    from normsoftmax.embedding import read_embeddings
    from normsoftmax.search import build_index

    run_dir, _, embeddings = search_run
    index_dir = tmp_path_factory.mktemp("search_index") / "index"
    build_index(IndexBuildConfig(embeddings=str(embeddings), out=str(index_dir)))
    return run_dir, index_dir, read_embeddings(embeddings)
