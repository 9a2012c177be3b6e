"""`prepare` end to end: archives in each benchmark's real layout, served by a local HTTP server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import pytest

from fixtures import write_sop
from normsoftmax.config import PrepareConfig
from normsoftmax.data.cache import find_cache
from normsoftmax.data.images import ImageTransformConfig
from normsoftmax.data.registry import dataset_spec, load_dataset
from normsoftmax.prepare import command as prepare
from normsoftmax.prepare import extract
from normsoftmax.prepare.command import PrepareError, check_prepared, prepare_dataset


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(root: Path, dataset: str, **fields) -> PrepareConfig:
    return PrepareConfig(dataset=dataset, root=str(root), workers=1, backoff=0.001, timeout=10, progress=False,
                         **fields)


def _serve_as_official(replace_dataset_spec, server, name: str, archive: Path) -> str:
    """Point the dataset's default source at the local server, with the fixture's checksum pinned."""
    spec = dataset_spec(name).files[0]
    url = server.add(archive.name, archive.read_bytes())
    pinned = dataclasses.replace(spec, urls=(url,), sha256=_sha(archive), md5=None, size=archive.stat().st_size)
    replace_dataset_spec(name, files=(pinned,))
    return url


def test_cub_default_download_survives_a_drop_and_an_error_and_verifies(tmp_path, server, archives, monkeypatch,
                                                                        replace_dataset_spec):
    _serve_as_official(replace_dataset_spec, server, "cub200", archives["cub"])
    server.rules["CUB_200_2011.tgz"] = {"fail": [503], "drop_after": 5000, "drop_times": 1}
    reference = {"train": {"images": 12, "classes": 4}, "test": {"images": 12, "classes": 4}}
    replace_dataset_spec("cub200", reference_counts=reference)
    manifest = prepare_dataset(_config(tmp_path, "cub200"))

    assert server.ranges("CUB_200_2011.tgz") == [None, None, "bytes=5000-"]
    assert manifest["ok"] and manifest["status"] == "complete" and manifest["official"]
    assert manifest["dataset_root"] == str(tmp_path / "CUB_200_2011")
    assert manifest["counts"] == reference and manifest["reference_differences"] == []
    assert manifest["checksums"]["CUB_200_2011.tgz"]["sha256"] == _sha(archives["cub"])
    assert manifest["sources"][0]["checksum"] == "pinned (official)" and manifest["bad_files"] == []
    assert json.loads((tmp_path / "manifest.json").read_text())["dataset_root"] == manifest["dataset_root"]
    assert (tmp_path / "attributes.txt").is_file()
    records = load_dataset("Cub200", manifest["dataset_root"])
    assert len(records.train) == 12 and len(records.test) == 12


def test_official_download_with_other_counts_is_an_error(tmp_path, server, archives, monkeypatch, replace_dataset_spec):
    _serve_as_official(replace_dataset_spec, server, "cub200", archives["cub"])
    with pytest.raises(PrepareError, match="reference count is 5864"):
        prepare_dataset(_config(tmp_path, "cub200"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "failed" and not manifest["ok"] and manifest["reference_differences"]


def test_sop_from_a_custom_url_is_recorded_and_only_warned_about(tmp_path, server, archives, caplog):
    url = server.add("Stanford_Online_Products.zip", archives["sop"].read_bytes())
    with caplog.at_level("WARNING", logger="normsoftmax.prepare"):
        manifest = prepare_dataset(_config(tmp_path, "sop", urls=[url]))
    assert manifest["ok"] and not manifest["official"]
    assert manifest["checksums"]["Stanford_Online_Products.zip"]["sha256"] == _sha(archives["sop"])
    assert any("unverified" in w for w in manifest["warnings"])
    assert any("unverified" in r.message for r in caplog.records)
    assert any("counts differ" in w for w in manifest["warnings"]) and manifest["reference_differences"]
    assert manifest["dataset_root"] == str(tmp_path / "Stanford_Online_Products")
    records = load_dataset("StanfordOnlineProducts", manifest["dataset_root"])
    assert len(records.train) == 18 and len(records.test) == 18


@pytest.mark.parametrize("how", ["archives", "urls"])
def test_cars_from_archives_or_urls(tmp_path, server, archives, how):
    if how == "archives":
        fields = {"from_archives": [str(archives["cars_annos"]), str(archives["cars_images"])]}
    else:
        fields = {"urls": [server.add("files/car_ims.tgz", archives["cars_images"].read_bytes()),
                           server.add("files/cars_annos.mat", archives["cars_annos"].read_bytes())]}
    manifest = prepare_dataset(_config(tmp_path, "cars196", **fields))
    assert manifest["ok"] and manifest["dataset_root"] == str(tmp_path)
    assert (tmp_path / "cars_annos.mat").read_bytes() == archives["cars_annos"].read_bytes()
    assert set(manifest["checksums"]) == {"car_ims.tgz", "cars_annos.mat"}
    records = load_dataset("Cars196", manifest["dataset_root"])
    assert len(records.train) + len(records.test) == 24


def test_inshop_from_archives(tmp_path, archives):
    manifest = prepare_dataset(_config(tmp_path, "inshop", from_archives=[str(archives["inshop_images"]),
                                                                           str(archives["inshop_list"])]))
    assert manifest["ok"] and (tmp_path / "Eval" / "list_eval_partition.txt").is_file()
    records = load_dataset("InShop", manifest["dataset_root"])
    assert records.query_gallery and len(records.query) == 12 and len(records.gallery) == 12


def test_inshop_without_archives_says_what_to_fetch(tmp_path):
    with pytest.raises(PrepareError) as caught:
        prepare_dataset(_config(tmp_path, "inshop"))
    message = str(caught.value)
    for needed in ("img.zip", "Eval/list_eval_partition.txt", "mmlab.ie.cuhk.edu.hk/projects/DeepFashion",
                   "--from-archive", str(tmp_path)):
        assert needed in message
    assert list(tmp_path.iterdir()) == []


def test_cars_without_archives_asks_for_them(tmp_path, archives):
    with pytest.raises(PrepareError, match="--from-archive .*car_ims.tgz"):
        prepare_dataset(_config(tmp_path, "cars196"))
    with pytest.raises(PrepareError, match="missing cars_annos.mat"):
        prepare_dataset(_config(tmp_path, "cars196", from_archives=[str(archives["cars_images"])]))


def test_checksum_mismatch_extracts_nothing(tmp_path, server, archives):
    url = server.add("CUB_200_2011.tgz", archives["cub"].read_bytes())
    with pytest.raises(PrepareError, match=r"moved aside to .*CUB_200_2011\.tgz\.bad"):
        prepare_dataset(_config(tmp_path, "cub200", urls=[url], sha256=["ab" * 32]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives"]
    assert sorted(p.name for p in (tmp_path / "archives").iterdir()) == ["CUB_200_2011.tgz.bad"]

    local = tmp_path / "local"
    with pytest.raises(PrepareError, match="does not match.*Nothing was extracted"):
        prepare_dataset(_config(local, "cub200", from_archives=[str(archives["cub"])], sha256=["cd" * 32]))
    assert list(local.iterdir()) == [] and archives["cub"].is_file()


def test_sha256_given_by_name_or_position(tmp_path, archives):
    images, annos = archives["cars_images"], archives["cars_annos"]
    by_name = [f"cars_annos.mat={_sha(annos)}", f"car_ims.tgz={_sha(images)}"]
    manifest = prepare_dataset(_config(tmp_path / "a", "cars196", from_archives=[str(images), str(annos)],
                                       sha256=by_name))
    assert {e["checksum"] for e in manifest["sources"]} == {"given with --sha256"}
    positional = [_sha(images), _sha(annos)]
    prepare_dataset(_config(tmp_path / "b", "cars196", from_archives=[str(images), str(annos)], sha256=positional))
    with pytest.raises(PrepareError, match="does not match"):
        prepare_dataset(_config(tmp_path / "c", "cars196", from_archives=[str(images), str(annos)],
                                sha256=positional[::-1]))
    with pytest.raises(PrepareError, match="64 hexadecimal"):
        prepare_dataset(_config(tmp_path / "d", "cars196", from_archives=[str(images), str(annos)], sha256=["xyz"]))


def test_rerun_is_a_fast_no_op(tmp_path, server, archives, monkeypatch):
    url = server.add("Stanford_Online_Products.zip", archives["sop"].read_bytes())
    first = prepare_dataset(_config(tmp_path, "sop", urls=[url]))
    requests = len(server.requests)

    def forbidden(*args, **kwargs):
        raise AssertionError("a completed preparation did work again")

    for module, name in [(prepare, "download"), (prepare, "extract_archive"), (prepare, "load_dataset"),
                         (prepare, "file_digests"), (extract, "_open")]:
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr("normsoftmax.data.images.find_bad_images", forbidden)
    started = time.perf_counter()
    assert prepare_dataset(_config(tmp_path, "sop", urls=[url])) == first
    assert prepare_dataset(_config(tmp_path, "sop")) == first  # no sources named: whatever is prepared is kept
    assert time.perf_counter() - started < 0.5 and len(server.requests) == requests


def test_check_detects_deleted_and_corrupted_images_and_a_rerun_repairs(tmp_path, archives):
    manifest = prepare_dataset(_config(tmp_path, "cub200", from_archives=[str(archives["cub"])]))
    records = load_dataset("cub200", manifest["dataset_root"])
    deleted, corrupted = Path(records.train.paths[0]), Path(records.test.paths[-1])
    deleted.unlink()
    corrupted.write_bytes(corrupted.read_bytes()[:200])

    assert prepare_dataset(_config(tmp_path, "cub200", from_archives=[str(archives["cub"])])) == manifest  # no check
    with pytest.raises(PrepareError, match="2 of 24 images"):
        prepare_dataset(_config(tmp_path, "cub200", from_archives=[str(archives["cub"])], check=True))
    report = check_prepared(tmp_path, workers=1, progress=False)
    assert not report["ok"] and report["status"] == "failed"
    assert {path for path, _ in report["bad_files"]} == {str(deleted), str(corrupted)}
    assert check_prepared(manifest["dataset_root"], "Cub200", workers=1,
                          progress=False)["bad_files"] == report["bad_files"]

    repaired = prepare_dataset(_config(tmp_path, "cub200", from_archives=[str(archives["cub"])]))
    assert repaired["ok"] and deleted.is_file()
    assert check_prepared(tmp_path, workers=1, progress=False)["ok"]


def test_interrupted_extraction_is_redone(tmp_path, archives, monkeypatch):
    real = extract._apply_metadata
    calls = []

    def crash(path, member):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(path, member)

    monkeypatch.setattr(extract, "_apply_metadata", crash)
    config = _config(tmp_path, "sop", from_archives=[str(archives["sop"])])
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(config)
    assert not (tmp_path / "manifest.json").exists()
    monkeypatch.setattr(extract, "_apply_metadata", real)
    manifest = prepare_dataset(config)
    assert manifest["ok"] and manifest["counts"]["train"]["images"] == 18


def test_cache_is_built_once_and_found_by_training(tmp_path, archives, monkeypatch):
    config = _config(tmp_path, "sop", from_archives=[str(archives["sop"])], cache=True)
    manifest = prepare_dataset(config)
    assert manifest["cache"]["resize"] == 256 and manifest["cache"]["keep_aspect"] is False
    records = load_dataset("sop", manifest["dataset_root"])
    assert find_cache(records, ImageTransformConfig()) is not None
    assert find_cache(records, ImageTransformConfig(keep_aspect=True)) is None

    monkeypatch.setattr("normsoftmax.prepare.cache.build_cache", lambda *a,
                        **k: pytest.fail("rebuilt an up-to-date cache"))
    assert prepare_dataset(config)["cache"] == manifest["cache"]


def test_a_root_holds_one_dataset(tmp_path, archives):
    prepare_dataset(_config(tmp_path, "sop", from_archives=[str(archives["sop"])]))
    with pytest.raises(PrepareError, match="already holds sop"):
        prepare_dataset(_config(tmp_path, "cub200", from_archives=[str(archives["cub"])]))


def test_check_without_manifest_detects_the_layout(tmp_path):
    base = write_sop(tmp_path)
    report = check_prepared(tmp_path, workers=1, progress=False)
    assert report["dataset"] == "sop" and report["ok"] and report["dataset_root"] == str(base)
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(PrepareError, match="no manifest.json and no known dataset layout"):
        check_prepared(tmp_path / "Stanford_Online_Products" / "bicycle_final", progress=False)


def test_next_mirror_is_tried_when_one_fails(tmp_path, server, archives, monkeypatch, replace_dataset_spec):
    good = _serve_as_official(replace_dataset_spec, server, "sop", archives["sop"])
    spec = dataset_spec("sop").files[0]
    mirrors = dataclasses.replace(spec, urls=(f"{server.base}/gone/Stanford_Online_Products.zip", good))
    replace_dataset_spec("sop", files=(mirrors,),
                         reference_counts={"train": {"images": 18, "classes": 6}, "test": {"images": 18, "classes": 6}})
    manifest = prepare_dataset(_config(tmp_path, "sop"))
    assert manifest["ok"] and manifest["official"] and manifest["sources"][0]["location"] == good
    assert [name for name, _ in server.requests] == ["gone/Stanford_Online_Products.zip",
                                                     "Stanford_Online_Products.zip"]
