"""``normsoftmax calibrate`` on an embeddings file: what it writes and which threshold an index applies."""

import json

import numpy as np
import pytest

from normsoftmax.calibration import calibrate_checkpoint, decisions_of, read_calibration
from normsoftmax.config import CalibrateConfig
from normsoftmax.embedding.files import write_embeddings


@pytest.fixture
def labelled(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 8))
    labels = np.repeat(np.arange(12), 6)
    vectors = centres[labels] + rng.normal(scale=0.8, size=(len(labels), 8))
    path = tmp_path / "labelled.npz"
    write_embeddings(path, vectors, [f"{i}.png" for i in range(len(labels))], labels,
                     {"model": {"digest": "d" * 64}})
    return path


def test_the_applied_target_is_the_one_asked_for(labelled, tmp_path):
    out = tmp_path / "calibration.json"
    document = calibrate_checkpoint(CalibrateConfig(source=str(labelled), target_precision=[0.9],
                                                    target_fmr=[0.01], apply="fmr", out=str(out)))
    assert document["targets"] == ["precision>=0.9", "fmr<=0.01"] and document["default"] == "fmr<=0.01"
    carried = decisions_of(read_calibration(out, "d" * 64))
    fmr_decision = next(d for d in document["kinds"]["float"]["decisions"] if d["target"] == "fmr<=0.01")
    assert carried["float"]["target"] == "fmr<=0.01" and carried["float"]["threshold"] == fmr_decision["threshold"]
    # without --apply: the precision target
    document = calibrate_checkpoint(CalibrateConfig(source=str(labelled), target_precision=[0.9],
                                                    target_fmr=[0.01], out=str(out)))
    assert json.loads(out.read_text())["default"] == "precision>=0.9" == document["default"]


def test_apply_without_such_a_target_is_refused(labelled, tmp_path):
    with pytest.raises(ValueError, match="no fmr target"):
        calibrate_checkpoint(CalibrateConfig(source=str(labelled), target_precision=[0.9], apply="fmr",
                                             out=str(tmp_path / "c.json")))
    with pytest.raises(ValueError, match="another model"):
        calibrate_checkpoint(CalibrateConfig(source=str(labelled), out=str(tmp_path / "c.json")))
        read_calibration(tmp_path / "c.json", "e" * 64)
