import json
import os
from pathlib import Path

from normsoftmax import DemoConfig, run_demo


def test_demo_command_end_to_end_on_a_small_glyph_set(tmp_path, cli):
    code, out, err = cli("demo", "--output", tmp_path / "demo", "--num-classes", "8", "--images-per-class", "6",
                         "--image-size", "32", "--epochs", "1", "--workers", "0", "--no-progress")
    assert code == 0, err
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results) >= {"trained", "untrained", "raw_pixels"}
    for name in ("trained", "untrained", "raw_pixels"):
        assert results[name]["num_queries"] == 24  # 4 unseen classes x 6 images
        assert set(results[name]["binary"]) >= {"recall@1", "recall@8", "map@r"}
    assert "raw pixels" in out and "untrained" in out and str(tmp_path / "demo" / "results.json") in out
    assert (tmp_path / "demo" / "run" / "eval" / "epoch_001.json").exists()
    # the first run ends in a browser: the unseen glyphs indexed, and the command that serves them
    from normsoftmax.search import SearchIndex

    index = SearchIndex.open(tmp_path / "demo" / "index")
    assert index.count == 24 and set(index.kinds) == {"float", "binary"}
    serve = next(line.split() for line in out.splitlines() if " serve " in line)
    # pasted into a new shell, whose PATH knows no normsoftmax: an absolute path to this environment's program
    assert Path(serve[0]).is_absolute() and os.access(serve[0], os.X_OK) and Path(serve[0]).name == "normsoftmax"
    demo = (tmp_path / "demo").resolve()
    assert serve[1:] == ["serve", str(demo / "run"), str(demo / "index")]
    # match thresholds from the unseen classes, in the run and carried by the index
    calibration = json.loads((tmp_path / "demo" / "run" / "calibration.json").read_text())
    assert calibration["model"]["digest"] == index.digest and calibration["classes"] == 4
    assert index.calibration["digest"] == index.digest


def test_demo_rerun_reuses_the_glyphs_and_keeps_the_earlier_run(tmp_path):
    config = DemoConfig(output=str(tmp_path), num_classes=8, images_per_class=4, image_size=32, epochs=1, workers=0,
                        progress=False)
    run_demo(config)
    manifest = (tmp_path / "glyphs" / "glyphs.json").stat().st_mtime_ns
    run_demo(config)
    assert (tmp_path / "glyphs" / "glyphs.json").stat().st_mtime_ns == manifest
    assert len(list(tmp_path.glob("run-*"))) == 1 and (tmp_path / "run" / "config.json").exists()
