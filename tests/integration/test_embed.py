"""`normsoftmax embed`: folders, CSVs and dataset splits into embeddings files; resumable and exact."""

import csv
import json

import numpy as np
import pytest

from normsoftmax.checkpoint import load_embedder
from normsoftmax.config import EmbedConfig
from normsoftmax.embedding import embed_files, embed_images, read_embeddings


def config(run_dir, out, **extra):
    return EmbedConfig(checkpoint=str(run_dir), out=str(out), batch_size=4, workers=0, progress=False, **extra)


def test_a_folder_is_embedded_as_the_model_embeds_each_image(trained_run, tmp_path):
    run_dir, root = trained_run
    summary = embed_files(config(run_dir, tmp_path / "all.npz", images=str(root)))
    data = read_embeddings(tmp_path / "all.npz")
    assert summary["count"] == len(data) == 48 and data.dim == 16 and data.labels is None
    assert data.paths == sorted(str(p) for p in root.rglob("*.jpg"))
    model = load_embedder(run_dir)
    direct = embed_images(model, data.paths[:5], batch_size=4)
    np.testing.assert_allclose(data.embeddings[:5], direct, atol=1e-6)
    assert data.metadata["model"]["digest"] == model.digest and data.metadata["complete"] is True
    assert not list(tmp_path.glob("all.npz.part-*"))


def test_an_interrupted_embedding_resumes_to_the_same_file(trained_run, tmp_path, monkeypatch):
    run_dir, root = trained_run
    embed_files(config(run_dir, tmp_path / "whole.npz", images=str(root)))
    import normsoftmax.embedding.command as command

    real, calls = command.write_embeddings, []

    def crash_after_two_chunks(path, *args, **kwargs):
        real(path, *args, **kwargs)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C between two chunks

    monkeypatch.setattr(command, "write_embeddings", crash_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        embed_files(config(run_dir, tmp_path / "resumed.npz", images=str(root), save_every=8))
    monkeypatch.undo()
    chunks = sorted(tmp_path.glob("resumed.npz.part-*.npz"))
    assert len(chunks) == 2 and not (tmp_path / "resumed.npz").exists()
    written = []

    def recording(path, embeddings, *args, **kwargs):
        written.append(len(embeddings) if ".part-" in str(path) else 0)
        return real(path, embeddings, *args, **kwargs)

    monkeypatch.setattr(command, "write_embeddings", recording)
    embed_files(config(run_dir, tmp_path / "resumed.npz", images=str(root), save_every=8))
    assert sum(written) == 48 - 16  # only what the two chunks did not hold was embedded again
    whole, resumed = read_embeddings(tmp_path / "whole.npz"), read_embeddings(tmp_path / "resumed.npz")
    assert resumed.paths == whole.paths
    assert np.array_equal(resumed.embeddings, whole.embeddings)  # bit for bit: the same batches
    assert not list(tmp_path.glob("resumed.npz.part-*"))


def test_a_csv_with_labels_and_a_dataset_split(trained_run, tmp_path):
    run_dir, root = trained_run
    images = sorted(root.rglob("*.jpg"))[:10]
    with open(tmp_path / "list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([[str(p.relative_to(root)), p.parent.name] for p in images])
    (tmp_path / "list.csv").rename(root / "list.csv")
    embed_files(config(run_dir, tmp_path / "csv.npz", images=str(root / "list.csv")))
    data = read_embeddings(tmp_path / "csv.npz")
    assert data.paths == [str(p) for p in images]
    assert [data.metadata["label_names"][i] for i in data.labels] == [p.parent.name for p in images]
    (root / "list.csv").unlink()
    embed_files(config(run_dir, tmp_path / "test.npz", dataset="folder", dataset_root=str(root), split="test"))
    test = read_embeddings(tmp_path / "test.npz")
    assert len(test) == 24 and test.metadata["source"]["split"] == "test"
    assert test.metadata["label_names"] == [f"class_{i:02d}" for i in range(4, 8)]


def test_refusals_are_clear(trained_run, tmp_path, cli):
    run_dir, root = trained_run
    code, _, err = cli("embed", run_dir, root / "class_00" / "0.jpg", "--out", tmp_path / "x.npz")
    assert code == 2 and "neither a folder of images nor a .csv file" in err
    code, _, err = cli("embed", run_dir, root, "--dataset", "folder", "--out", tmp_path / "x.npz")
    assert code == 2 and "either a folder / CSV" in err
    np.savez(tmp_path / "other.npz", embeddings=np.zeros((1, 16), np.float32), paths=np.array(["a"]),
             metadata=np.asarray(json.dumps({"model": {"digest": "0" * 64}})))
    code, _, err = cli("embed", run_dir, root, "--out", tmp_path / "other.npz", "--workers", "0", "--no-progress")
    assert code == 2 and "another model" in err and "Traceback" not in err
