"""Distributed data parallel under torchrun (Gloo, 2 processes on the CPU)."""

import subprocess
import sys
from pathlib import Path

from fixtures import TINY, write_cub200


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
