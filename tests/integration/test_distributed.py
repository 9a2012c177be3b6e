"""Distributed data parallel under torchrun (Gloo, 2 processes on the CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


_SAME_BATCH_SCRIPT = """
import sys
import torch
from normsoftmax.model import register_backbone


@register_backbone("tiny_without_batchnorm")
def tiny(pretrained):
    # No BatchNorm: under DDP each rank normalises by its own slice's statistics, a single process by the
    # whole batch's; without it, averaged gradients must equal the full batch's exactly (up to rounding).
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
                              torch.nn.ReLU())
    return net, 16


from normsoftmax import TrainConfig, train_embedder

train_embedder(TrainConfig(dataset="Cub200", dataset_root=sys.argv[1], run_dir=sys.argv[2],
                           model_name="tiny_without_batchnorm", weights="none", dim=8, batch_size=8,
                           images_per_class=2, class_balancing=True, lr=0.05,
                           pretrain_epochs=1, epochs_per_step=2, num_steps=1, test_every_n_epochs=2, resize=36, crop=32,
                           workers=0, progress=False, amp="none", channels_last=False, checkpoint_every_minutes=0))
"""


def test_two_processes_train_as_one_on_the_same_global_batch(tmp_path):
    """2 Gloo ranks, each with its slice of every class-balanced batch, end with the parameters of one process
    that saw the whole batches (the same images, the same augmentations)."""
    root = write_cub200(tmp_path / "data", num_classes=8, images_per_class=6)
    script = tmp_path / "train.py"
    script.write_text(_SAME_BATCH_SCRIPT)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), str(root), str(tmp_path / "single")], capture_output=True,
                            text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = Path(sys.executable).parent / "torchrun"
    double = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), str(root), str(tmp_path / "ddp")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    one = torch.load(tmp_path / "single" / "checkpoints" / "epoch_003.pt", weights_only=True)
    two = torch.load(tmp_path / "ddp" / "checkpoints" / "epoch_003.pt", weights_only=True)
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two["criterion"]["proxies"], one["criterion"]["proxies"], rtol=1e-4, atol=1e-5)
    initial = torch.load(tmp_path / "single" / "checkpoints" / "epoch_001.pt", weights_only=True)
    moved = max(float((one["model"][k] - initial["model"][k]).abs().max()) for k in one["model"])
    assert moved > 1e-3  # the main phase really changed the weights the two runs agree on
    # the evaluation embedded on both ranks and gathered: the same metrics
    single_metrics = json.loads((tmp_path / "single" / "final_metrics.json").read_text())
    ddp_metrics = json.loads((tmp_path / "ddp" / "final_metrics.json").read_text())
    assert ddp_metrics["num_queries"] == single_metrics["num_queries"]
    assert ddp_metrics["float"]["recall@1"] == pytest.approx(single_metrics["float"]["recall@1"], abs=1e-6)
