"""``normsoftmax report``: one self-contained HTML page about a run, checked against the run's own files.

The numbers on the page are compared with metrics.jsonl and the TensorBoard events read here; the grids'
neighbours with a ranking computed here from the checkpoint's embeddings; the frame colours with the pixels
of the decoded grid PNGs.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from normsoftmax.config import ReportConfig
from normsoftmax.report import write_report
from normsoftmax.report.figures import CORRECT_COLOUR, QUERY_COLOUR, WRONG_COLOUR
from normsoftmax.report.neighbours import ranked_gallery, worst_queries

QUERIES, WORST, K = 4, 3, 8  # K above the 5 other images of a test class: every row has red frames too
BATCH = 8  # the run's evaluation batch: the same embeddings, to the bit, as the run's evaluation


@pytest.fixture(scope="module")
def report(trained_run, tmp_path_factory):
    """The fixture run's report: (html text, run_dir, data_root)."""
    run_dir, data_root = trained_run
    out = tmp_path_factory.mktemp("report") / "report.html"
    written = write_report(ReportConfig(run_dir=str(run_dir), out=str(out), queries=QUERIES, worst=WORST, k=K,
                                        batch_size=BATCH, device="cpu", seed=3))
    assert written == out
    return out.read_text(encoding="utf-8"), Path(run_dir), Path(data_root)


# ------------------------------------------------------------------------------------------------ helpers
class _Elements(HTMLParser):
    """Every element's tag and attributes, and the <img> sources."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


def elements(html: str) -> list[tuple[str, dict]]:
    parser = _Elements()
    parser.feed(html)
    return parser.elements


def section(html: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}"[^>]*>(.*?)</section>', html, re.DOTALL)
    assert match, f"no section {section_id}"
    return match.group(1)


def images_in(html: str) -> list[Image.Image]:
    found = []
    for data in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', html):
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        assert image.format == "PNG"
        found.append(image.convert("RGB"))
    return found


def table_rows(html: str, table_id: str) -> list[list[tuple[str, str]]]:
    """(class, inner html) of each body cell, row by row; header cells (<th>) count with class 'th'."""
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', html, re.DOTALL)
    assert body, f"no table {table_id}"
    return [[(css or "th", inner) for css, inner in re.findall(r'<t[dh](?: class="([^"]*)")?>(.*?)</t[dh]>', row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body.group(1))]


def evaluations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def frames(image: Image.Image) -> dict[str, int]:
    """How many separate frames (rings of at least 100 pixels of exactly one frame colour) the image has."""
    pixels = np.asarray(image)
    counts = {}
    for name, colour in (("query", QUERY_COLOUR), ("correct", CORRECT_COLOUR), ("wrong", WRONG_COLOUR)):
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        components, _ = ndimage.label(np.all(pixels == rgb, axis=-1))
        counts[name] = int((np.bincount(components.ravel())[1:] >= 100).sum())
    return counts


def label_of(cell_html: str) -> str:
    return re.search(r'<span class="label">(.*?)</span>', cell_html).group(1)


def file_of(cell_html: str) -> str:
    return re.search(r"<small>(.*?)</small>", cell_html).group(1)


# ------------------------------------------------------------------------------------------------ the page
def test_the_report_is_one_self_contained_html_file(report):
    html, _, _ = report
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    tags = elements(html)
    for tag, attributes in tags:
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            if name in attributes:
                assert tag == "img" and name == "src" and attributes[name].startswith("data:image/png;base64,"), \
                    f"<{tag} {name}={attributes[name][:60]!r}> points outside the page"
    assert not {"script", "link", "iframe", "object", "embed"} & {tag for tag, _ in tags}
    assert "url(" not in html and "@import" not in html
    sources = [attributes["src"] for tag, attributes in tags if tag == "img"]
    assert len(images_in(html)) == len(sources) == 4  # curves, Recall@K, the two grids: each a decodable PNG
    assert "Missing from this report" not in html


def test_curves_show_the_logged_scalars_and_every_evaluation(report):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    html, run_dir, _ = report
    curves = section(html, "curves")
    (figure,) = images_in(curves)
    assert figure.size == (1100, 700)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {row[0][1]: row for row in table_rows(curves, "scalars")}
    for tag in ("train/loss", "train/lr", "train/epoch_loss", "train/images_per_second"):
        logged = events.Scalars(tag)
        assert scalars[tag][1][1] == str(len(logged))
        assert scalars[tag][2][1] == f"{logged[0].step}-{logged[-1].step}"
        assert float(scalars[tag][3][1]) == pytest.approx(logged[-1].value, rel=1e-5)
    rows = table_rows(curves, "evaluations")
    logged_evaluations = evaluations(run_dir)
    assert len(rows) == len(logged_evaluations) == 2
    for row, entry in zip(rows, logged_evaluations, strict=True):
        assert row[0][1] == str(entry["epoch"])
        assert row[2][1] == f"{entry['float']['recall@1']:.2f}"
        assert row[5][1] == f"{entry['binary']['recall@1']:.2f}"


def test_recall_at_k_table_has_the_last_evaluations_numbers(report):
    html, run_dir, _ = report
    last = evaluations(run_dir)[-1]
    recall = section(html, "recall")
    rows = {row[0][1]: [inner for _, inner in row[1:]] for row in table_rows(recall, "recall-at-k")}
    for k in last["ks"]:
        floats, binary = last["float"][f"recall@{k}"], last["binary"][f"recall@{k}"]
        assert rows[f"R@{k}"] == [f"{floats:.2f}", f"{binary:.2f}", f"{binary - floats:.2f}"]
    assert rows["MAP@R"][:2] == [f"{last['float']['map@r']:.2f}", f"{last['binary']['map@r']:.2f}"]
    assert rows["NMI"][:2] == [f"{last['float']['nmi']:.4f}", f"{last['binary']['nmi']:.4f}"]
    assert len(images_in(recall)) == 1


@pytest.fixture(scope="module")
def reference(report):
    """The ranking computed here: the test split, its files relative to the data root, and every query's gallery
    order (float64 cosine of the checkpoint's embeddings, the query left out, ties by index)."""
    from normsoftmax.checkpoint import load_embedder
    from normsoftmax.data.registry import load_dataset
    from normsoftmax.embedding.embed import embed_images

    _, run_dir, data_root = report
    test = load_dataset("folder", data_root).test
    embeddings = embed_images(load_embedder(run_dir), test.paths, batch_size=BATCH, device="cpu").astype(np.float64)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = unit @ unit.T
    np.fill_diagonal(scores, -np.inf)
    order = np.stack([np.lexsort((np.arange(len(test)), -row))[:-1] for row in scores])
    files = [str(Path(path).relative_to(data_root)) for path in test.paths]
    return test, files, order


def test_grids_retrieve_what_the_checkpoint_retrieves(report, reference):
    """Same neighbours (files, order, labels, correctness) as the ranking computed here."""
    html, run_dir, _ = report
    test, files, order = reference
    for section_id in ("samples", "worst"):
        rows = table_rows(section(html, section_id), f"{section_id}-neighbours")
        assert len(rows) == (QUERIES if section_id == "samples" else WORST)
        for row in rows:
            query = files.index(file_of(row[0][1]))
            assert label_of(row[0][1]) == test.class_names[test.labels[query]]
            expected = order[query, :K]
            assert [file_of(inner) for _, inner in row[3:]] == [files[i] for i in expected]
            for (css, inner), index in zip(row[3:], expected, strict=True):
                assert css == ("hit" if test.labels[index] == test.labels[query] else "miss")
                assert label_of(inner) == test.class_names[test.labels[index]]
    # The checkpoint is the last evaluated epoch's: its metrics, recomputed for the grids, are the logged ones.
    last = evaluations(run_dir)[-1]
    recomputed = {row[0][1]: row for row in table_rows(section(html, "retrieval"), "recomputed")}
    for k in last["ks"]:
        assert recomputed[f"R@{k}"][1][1] == f"{last['float'][f'recall@{k}']:.2f}"
        assert recomputed[f"R@{k}"][2][1] == f"{last['binary'][f'recall@{k}']:.2f}"


def test_grid_frames_are_green_when_correct_and_red_when_not(report):
    html, _, _ = report
    for section_id in ("samples", "worst"):
        body = section(html, section_id)
        rows = table_rows(body, f"{section_id}-neighbours")
        hits = sum(css == "hit" for row in rows for css, _ in row)
        misses = sum(css == "miss" for row in rows for css, _ in row)
        assert hits + misses == len(rows) * K and misses >= len(rows) * (K - 5)  # 6 images per class
        (grid,) = images_in(body)
        assert frames(grid) == {"query": len(rows), "correct": hits, "wrong": misses}


def test_worst_queries_have_the_lowest_average_precision(report, reference):
    html, _, _ = report
    test, files, order = reference
    relevant = test.labels[order] == test.labels[:, None]
    positives = relevant.sum(1)
    precision = np.cumsum(relevant, axis=1) / np.arange(1, order.shape[1] + 1)
    ap = np.array([(precision[q] * relevant[q])[:positives[q]].sum() / positives[q] for q in range(len(order))])
    first = relevant.argmax(1)
    expected = np.lexsort((np.arange(len(ap)), -first, ap))[:WORST]
    rows = table_rows(section(html, "worst"), "worst-neighbours")
    assert [files.index(file_of(row[0][1])) for row in rows] == expected.tolist()
    assert [float(row[1][1]) for row in rows] == pytest.approx(ap[expected], abs=5e-4)
    assert [int(row[2][1]) for row in rows] == (first[expected] + 1).tolist()


def test_worst_queries_order_by_ap_then_first_correct_rank_and_skip_queries_without_positives():
    per_query = {"average_precision": np.array([0.5, 0.2, 0.2, 1.0, 0.0]),
                 "first_positive_rank": np.array([0, 3, -1, 0, -1]), "num_positives": np.array([2, 2, 2, 2, 0])}
    assert worst_queries(per_query, 10).tolist() == [2, 1, 0, 3]
    assert worst_queries(per_query, 2).tolist() == [2, 1]


def test_neighbours_exclude_the_query_and_break_ties_by_gallery_index():
    vectors = np.array([[1, 0], [2, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    order, scores = ranked_gallery(vectors[[0, 3]], vectors, exclude=np.array([0, 3]))
    assert order.tolist() == [[1, 3, 4, 2], [0, 1, 4, 2]]
    assert scores[0].tolist() == pytest.approx([1, 1, 2 ** -0.5, 0])
    order, _ = ranked_gallery(vectors[[0]], vectors)  # query-gallery: nothing left out
    assert order.tolist() == [[0, 1, 3, 4, 2]]


# ------------------------------------------------------------------------------------------------ what is missing
def _copy_run(run_dir: Path, to: Path, parts=("config.json", "metrics.jsonl", "tensorboard")) -> Path:
    to.mkdir()
    for part in parts:
        source = run_dir / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, to / part)
    return to


def test_a_run_without_checkpoints_or_evaluations_still_gets_a_report(trained_run, tmp_path, caplog):
    run_dir, _ = trained_run
    copy = _copy_run(Path(run_dir), tmp_path / "run", ("config.json", "tensorboard"))
    with caplog.at_level(logging.WARNING, logger="normsoftmax.report"):
        html = write_report(ReportConfig(run_dir=str(copy))).read_text()  # default: RUN_DIR/report.html
    missing = section(html, "missing")
    assert "no checkpoint" in missing and "metrics.jsonl: not found" in missing
    assert "No retrieval grids" in html and "No evaluation yet" in html
    assert "train/loss" in section(html, "curves") and len(images_in(html)) == 1  # the curves, no grids
    assert any("no checkpoint" in record.getMessage() for record in caplog.records)


def test_a_damaged_metrics_line_is_skipped_and_named(trained_run, tmp_path):
    run_dir, _ = trained_run
    copy = _copy_run(Path(run_dir), tmp_path / "run", ("config.json", "tensorboard"))
    first = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()[0]
    (copy / "metrics.jsonl").write_text(first + "\n{\"epoch\": 2, \"flo\n")  # a line cut short by a crash
    html = write_report(ReportConfig(run_dir=str(copy))).read_text()
    assert f"{copy / 'metrics.jsonl'}, line 2: not JSON" in section(html, "missing")
    assert [row[0][1] for row in table_rows(section(html, "curves"), "evaluations")] == ["1"]
    assert "Epoch 1" in section(html, "recall")


def test_an_empty_folder_gets_a_report_listing_everything_missing(tmp_path):
    (tmp_path / "run").mkdir()
    html = write_report(ReportConfig(run_dir=str(tmp_path / "run"), out=str(tmp_path / "r.html"))).read_text()
    missing = section(html, "missing")
    for absent in ("config.json: not found", "no TensorBoard event files", "metrics.jsonl: not found",
                   "no checkpoint"):
        assert absent in missing


def test_a_moved_dataset_is_reported_and_found_again_with_dataset_root(trained_run, tmp_path, cli):
    run_dir, data_root = trained_run
    data = shutil.copytree(data_root, tmp_path / "data")
    copy = _copy_run(Path(run_dir), tmp_path / "run")
    state = torch.load(Path(run_dir) / "checkpoints" / "epoch_002.pt", map_location="cpu", weights_only=True)
    state["config"]["dataset_root"] = str(data)
    (copy / "checkpoints").mkdir()
    torch.save(state, copy / "checkpoints" / "epoch_002.pt")
    moved = data.rename(tmp_path / "moved")

    code, out, _ = cli("report", copy, "--out", tmp_path / "moved.html", "--k", 2, "--queries", 2, "--worst", 1)
    assert code == 0 and out.strip() == f"report: {tmp_path / 'moved.html'}"
    html = (tmp_path / "moved.html").read_text()
    assert str(data) in section(html, "missing") and "--dataset_root" in section(html, "missing")
    assert "Recall@K at the last evaluation" in html and 'id="samples"' not in html

    code, _, _ = cli("report", copy, "--out", tmp_path / "found.html", "--k", 2, "--queries", 2, "--worst", 1,
                     "--dataset_root", moved)
    html = (tmp_path / "found.html").read_text()
    assert code == 0 and 'id="missing"' not in html
    assert len(table_rows(section(html, "samples"), "samples-neighbours")) == 2


def test_a_missing_run_directory_is_a_clear_error(tmp_path, cli):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        write_report(ReportConfig(run_dir=str(tmp_path / "nowhere")))
    code, _, err = cli("report", tmp_path / "nowhere")
    assert code == 2 and f"{tmp_path / 'nowhere'}: no such run directory" in err and "Traceback" not in err
    assert not (tmp_path / "nowhere").exists()


def test_a_calibrated_run_shows_its_thresholds_and_curves(search_run, tmp_path, cli):
    import shutil

    run_dir, _, _ = search_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    html_before = write_report(ReportConfig(run_dir=str(copy), out=str(tmp_path / "a.html"), queries=0, worst=0,
                                            device="cpu")).read_text()
    assert "Not calibrated" in section(html_before, "calibration")
    code, out, err = cli("calibrate", copy, "--target-precision", "0.9", "--target-fmr", "0.01", "--workers", "0",
                         "--no-progress", "--device", "cpu")
    assert code == 0, err
    calibration = json.loads((copy / "calibration.json").read_text())
    html = write_report(ReportConfig(run_dir=str(copy), out=str(tmp_path / "b.html"), queries=0, worst=0,
                                     device="cpu")).read_text()
    part = section(html, "calibration")
    rows = [[inner for _, inner in row] for row in table_rows(part, "calibration-table")]
    decisions = [(kind, d) for kind, c in calibration["kinds"].items() for d in c["decisions"]]
    assert len(rows) == len(decisions) == 4 and "<img" in part
    for row, (kind, decision) in zip(rows, decisions, strict=True):
        assert row[0] == kind and row[1].replace("&gt;", ">").replace("&lt;", "<") == decision["target"]
        if decision["reachable"]:
            assert row[3] == f"{100 * decision['held_out']['precision']:.2f}"
