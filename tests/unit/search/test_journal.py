"""An index folder that changes while it is used: the journal, two users of one folder, searches during writes,
compaction, a full disk, a torn last line, and folders written before ids could be removed."""

from __future__ import annotations

import errno
import json
import threading

import faiss
import numpy as np
import pytest

from normsoftmax.embedding.files import EmbeddingsFile
from normsoftmax.files import NotEnoughSpaceError
from normsoftmax.search import SearchIndex, journal
from normsoftmax.search import index as index_module


def _vectors(count, dim=8, seed=0):
    return np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)


@pytest.fixture
def folder(tmp_path):
    embeddings = EmbeddingsFile(_vectors(20), [f"/a/{i}.jpg" for i in range(20)], metadata={"model": {"digest": "m"}})
    SearchIndex.create(tmp_path / "ix", embeddings)
    return tmp_path / "ix"


def test_a_change_is_a_fsynced_journal_line_that_another_user_of_the_folder_picks_up(folder):
    writer, reader = SearchIndex.open(folder), SearchIndex.open(folder)
    ids = writer.add_items(_vectors(3, seed=1), ["/b/0.jpg", "/b/1.jpg", "/b/2.jpg"], ["x", "y", None])
    assert ids == [20, 21, 22]
    lines = (folder / "journal.000001.log").read_bytes().splitlines()
    assert len(lines) == 1 and lines[0].startswith(journal.MAGIC)
    assert reader.count == 20 and reader.refresh() and reader.count == 23 and reader.item(21)["label"] == "y"
    assert reader.refresh() is False  # nothing new: two stat calls
    # the reader writes next: its ids continue after the writer's, never reusing one
    assert reader.remove([21]) == [21] and reader.add_items(_vectors(1, seed=2), ["/c.jpg"]) == [23]
    writer.refresh()
    assert writer.count == 23 and writer.next_id == 24 and 21 not in writer.ids()
    assert SearchIndex.open(folder).ids().tolist() == list(range(21)) + [22, 23]


def test_a_torn_last_line_is_not_a_change_and_the_next_writer_cuts_it_off(folder):
    index = SearchIndex.open(folder)
    index.add_items(_vectors(1, seed=1), ["/b.jpg"])
    path = folder / "journal.000001.log"
    whole = path.read_bytes()
    torn = journal.encode(journal.Change("remove", [], [3]))[:-7]  # a crash in the middle of an append
    path.write_bytes(whole + torn)
    reopened = SearchIndex.open(folder)
    assert reopened.count == 21 and 3 in reopened.ids()  # the half-written removal never happened
    reopened.remove([4])
    assert path.read_bytes().startswith(whole) and torn not in path.read_bytes()
    assert SearchIndex.open(folder).ids().tolist() == [i for i in range(21) if i != 4]
    damaged = bytearray(path.read_bytes())
    damaged[len(whole) + 30] ^= 0x20  # a flipped bit in the last line: its checksum no longer matches
    path.write_bytes(bytes(damaged))
    assert 4 in SearchIndex.open(folder).ids()


def test_a_full_disk_fails_the_change_and_leaves_the_collection_as_it_was(folder, monkeypatch):
    index = SearchIndex.open(folder)
    index.add_items(_vectors(1, seed=1), ["/b.jpg"])
    before = (folder / "journal.000001.log").read_bytes()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal.os, "write", full)
    with pytest.raises(NotEnoughSpaceError, match="no space left"):
        index.add_items(_vectors(2, seed=2), ["/c.jpg", "/d.jpg"])
    monkeypatch.undo()
    assert (folder / "journal.000001.log").read_bytes() == before and index.count == 21
    assert SearchIndex.open(folder).count == 21 and index.add_items(_vectors(1, seed=3), ["/e.jpg"]) == [21]


def test_searches_see_a_collection_before_or_after_a_write_never_between(folder):
    index = SearchIndex.open(folder)
    stop = threading.Event()
    problems = []

    def search():
        while not stop.is_set():
            found = index.search(_vectors(4, seed=5), k=30)
            for item_id in found.ids.reshape(-1).tolist():
                if item_id >= 0:
                    try:
                        index.record(item_id)
                    except KeyError as error:  # a search result whose record is gone: removed since, allowed
                        if "removed" not in str(error):
                            problems.append(str(error))
            binary = index.search(_vectors(2, seed=6), k=30, kind="binary")
            if len(set(binary.ids[0][binary.ids[0] >= 0])) != (binary.ids[0] >= 0).sum():
                problems.append("duplicate ids")

    threads = [threading.Thread(target=search) for _ in range(2)]
    for thread in threads:
        thread.start()
    for round_ in range(30):
        new = index.add_items(_vectors(2, seed=10 + round_), [f"/n/{round_}a.jpg", f"/n/{round_}b.jpg"])
        index.remove([new[0]])
    stop.set()
    for thread in threads:
        thread.join()
    assert not problems and index.count == 50 and index.float_index.ntotal == index.binary_index.ntotal == 50


def test_the_journal_folds_into_a_new_generation(folder, monkeypatch):
    monkeypatch.setattr(index_module, "COMPACT_CHANGES", 4)
    index = SearchIndex.open(folder)
    for n in range(3):
        index.add_items(_vectors(1, seed=n), [f"/n/{n}.jpg"])
    assert index.metadata["generation"] == 1
    index.remove([0, 1])  # the fifth change: a new generation, the journal folded in
    metadata = json.loads((folder / "index.json").read_text())
    assert metadata["generation"] == 2 and metadata["next_id"] == 23 and metadata["count"] == 21
    assert not (folder / "journal.000001.log").exists() and not (folder / "journal.000002.log").exists()
    reopened = SearchIndex.open(folder)
    assert reopened.ids().tolist() == list(range(2, 23)) and reopened.item(22)["path"] == "/n/2.jpg"
    assert reopened.add_items(_vectors(1, seed=9), ["/n/last.jpg"]) == [23]


def test_folders_of_the_earlier_format_open_and_upgrade_on_the_next_change(tmp_path):
    """Format 1: plain faiss indexes whose ids were their positions, items without ids."""
    folder = tmp_path / "old"
    folder.mkdir()
    vectors = _vectors(6)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    flat, binary = faiss.IndexFlatIP(8), faiss.IndexBinaryFlat(8)
    flat.add(vectors)
    binary.add(np.packbits(vectors > 0, axis=1))
    faiss.write_index(flat, str(folder / "float.000001.faiss"))
    faiss.write_index_binary(binary, str(folder / "binary.000001.faiss"))
    paths = "".join(f"/old/{i}.jpg" for i in range(6)).encode()
    np.savez(folder / "items.000001.npz", path_bytes=np.frombuffer(paths, np.uint8),
             offsets=np.arange(0, 7 * 10, 10, dtype=np.int64), labels=np.full(6, -1), label_names=np.array([], str))
    files = {role: {"name": name, "bytes": (folder / name).stat().st_size} for role, name in
             (("float", "float.000001.faiss"), ("binary", "binary.000001.faiss"), ("items", "items.000001.npz"))}
    (folder / "index.json").write_text(json.dumps({"format": 1, "kind": "flat", "dim": 8, "count": 6,
                                                   "generation": 1, "files": files, "sources": [],
                                                   "model": {"digest": "m"}}))
    old = SearchIndex.open(folder)
    assert old.count == 6 and old.item(4)["path"] == "/old/4.jpg" and old.search(vectors[4:5], k=1).ids[0, 0] == 4
    assert old.remove([1]) == [1] and old.add_items(_vectors(1, seed=3), ["/new.jpg"]) == [6]
    old.compact()
    assert json.loads((folder / "index.json").read_text())["format"] == 2
    assert SearchIndex.open(folder).ids().tolist() == [0, 2, 3, 4, 5, 6]
