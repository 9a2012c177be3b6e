"""`normsoftmax index build|add|search` through the command line, with a real trained model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from normsoftmax.checkpoint import find_checkpoint, load_checkpoint
from normsoftmax.config import EmbedConfig
from normsoftmax.embedding import embed_files, read_embeddings


def perturbed_checkpoint(run_dir: Path, out: Path) -> Path:
    """Another model: the run's checkpoint with one weight changed."""
    state = load_checkpoint(run_dir)
    state["model"]["head.projection.weight"] = state["model"]["head.projection.weight"] + 0.01
    torch.save(state, out)
    return out


def unique_code_rows(vectors: np.ndarray) -> list[int]:
    """Rows whose sign pattern no other row shares: binary search can only put those first for sure."""
    codes = np.packbits(vectors > 0, axis=1)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return [row for row in range(len(vectors)) if counts[inverse.reshape(-1)[row]] == 1]


def test_build_then_search_finds_each_indexed_image_first(search_run, tmp_path, cli):
    _, root, embeddings = search_run
    code, out, err = cli("index", "build", embeddings, "--out", tmp_path / "ix")
    assert code == 0, err
    assert out.strip() == f"index {tmp_path / 'ix'}: 48 items, float, binary"
    stored = read_embeddings(embeddings)
    queries = sorted((root / "class_05").glob("*.jpg"))
    code, out, err = cli("index", "search", tmp_path / "ix", root / "class_05", "--k", "4", "--json", "--workers", "0")
    assert code == 0, err
    results = json.loads(out)
    assert [r["query"] for r in results] == [str(q) for q in queries]
    for result in results:
        first = result["neighbours"][0]
        assert first["path"] == result["query"] and first["score"] == pytest.approx(1.0, abs=1e-4)
        assert stored.paths[first["id"]] == result["query"] and len(result["neighbours"]) == 4
        assert result["score"] == "cosine"

    unique = [stored.paths[row] for row in unique_code_rows(stored.embeddings)]
    assert len(unique) >= 8, "the model's sign patterns should mostly differ"
    for query in unique[:3]:
        code, out, err = cli("index", "search", tmp_path / "ix", query, "--kind", "binary", "--json", "--k", "48")
        assert code == 0, err
        hits = json.loads(out)[0]["neighbours"]
        assert hits[0]["path"] == query and hits[0]["hamming"] == 0 and hits[0]["score"] == 1.0
        assert hits[1]["hamming"] > 0 and [h["hamming"] for h in hits] == sorted(h["hamming"] for h in hits)

    code, out, err = cli("index", "search", tmp_path / "ix", queries[0], "--k", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(queries[0]) and lines[1].split() == ["1", "1.0000", str(queries[0])]


def test_search_refuses_a_model_other_than_the_indexs(search_run, tmp_path, cli):
    run_dir, root, embeddings = search_run
    assert cli("index", "build", embeddings, "--out", tmp_path / "ix")[0] == 0
    other = perturbed_checkpoint(run_dir, tmp_path / "other.pt")
    code, out, err = cli("index", "search", tmp_path / "ix", root / "class_00" / "0.jpg", "--checkpoint", other)
    ours = read_embeddings(embeddings).metadata["model"]["digest"]
    from normsoftmax.checkpoint import load_embedder

    theirs = load_embedder(other).digest
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"this index was built with model {ours[:16]}" in err and f"is model {theirs[:16]}" in err


def test_search_says_when_the_recorded_checkpoint_is_gone(search_run, tmp_path, cli):
    run_dir, root, _ = search_run
    moved = tmp_path / "moved_run"
    shutil.copytree(run_dir, moved)
    embed_files(EmbedConfig(checkpoint=str(moved), images=str(root / "class_01"), out=str(tmp_path / "e.npz"),
                            workers=0, progress=False))
    assert cli("index", "build", tmp_path / "e.npz", "--out", tmp_path / "ix")[0] == 0
    shutil.rmtree(moved)
    query = root / "class_01" / "2.jpg"
    code, _, err = cli("index", "search", tmp_path / "ix", query)
    assert code == 2 and "the checkpoint recorded in" in err and "is gone; pass --checkpoint" in err
    code, out, err = cli("index", "search", tmp_path / "ix", query, "--checkpoint", find_checkpoint(run_dir), "--json")
    assert code == 0, err  # the same weights elsewhere are the same model
    assert json.loads(out)[0]["neighbours"][0]["path"] == str(query)


def test_add_appends_a_second_embeddings_file(search_run, tmp_path, cli):
    run_dir, root, _ = search_run
    for name, classes in (("first", ["class_00", "class_01"]), ("second", ["class_02"])):
        folder = tmp_path / name
        for class_name in classes:
            shutil.copytree(root / class_name, folder / class_name)
        embed_files(EmbedConfig(checkpoint=str(run_dir), images=str(folder), out=str(tmp_path / f"{name}.npz"),
                                workers=0, progress=False))
    assert cli("index", "build", tmp_path / "first.npz", "--out", tmp_path / "ix")[0] == 0
    code, out, err = cli("index", "add", tmp_path / "ix", tmp_path / "second.npz")
    assert code == 0, err
    assert out.strip() == f"index {tmp_path / 'ix'}: 18 items"
    query = tmp_path / "second" / "class_02" / "3.jpg"
    code, out, err = cli("index", "search", tmp_path / "ix", query, "--json", "--k", "1")
    assert code == 0, err
    assert json.loads(out)[0]["neighbours"][0] == {"id": 15, "path": str(query), "score": pytest.approx(1.0, abs=1e-4)}
    code, _, err = cli("index", "add", tmp_path / "ix", tmp_path / "second.npz")
    assert code == 2 and "already in the index" in err and "Traceback" not in err


def test_command_errors_are_one_line(tmp_path, cli):
    code, _, err = cli("index", "build", tmp_path / "nothing.npz", "--out", tmp_path / "ix")
    assert code == 2 and err.strip() == f"normsoftmax index: error: {tmp_path / 'nothing.npz'}: no such embeddings file"
    code, _, err = cli("index", "search", tmp_path, tmp_path)
    assert code == 2 and "not an index folder" in err and len(err.strip().splitlines()) == 1
