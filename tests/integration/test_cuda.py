"""The GPU paths: training with bf16 and fp16 (gradient scaler), embedding and evaluation on CUDA.

Skipped without a CUDA device; `benchmarks/gpu_check.sh` runs them on a GPU machine.
"""

import json

import numpy as np
import pytest
import torch

from fixtures import tiny_config, write_cub200
from normsoftmax import evaluate_embeddings, train_embedder
from normsoftmax.checkpoint import load_embedder
from normsoftmax.embedding import embed_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("amp", ["bf16", "fp16", "none"])
def test_training_on_cuda(tmp_path, amp):  # pragma: no cover - no GPU on the development machines
    root = write_cub200(tmp_path / "data", num_classes=8, images_per_class=4)
    summary = train_embedder(tiny_config(root, tmp_path / "run", device="cuda", amp=amp, workers=2))
    metrics = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert metrics["float"] == summary["last"]["float"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "epoch_003.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0  # the gradient scaler really ran


def test_embedding_on_cuda_matches_the_cpu(tmp_path):  # pragma: no cover - no GPU on the development machines
    root = write_cub200(tmp_path / "data", num_classes=8, images_per_class=4)
    train_embedder(tiny_config(root, tmp_path / "run", device="cpu", amp="none"))
    paths = sorted(str(p) for p in (root / "images").rglob("*.jpg"))[:12]
    on_cpu = embed_images(load_embedder(tmp_path / "run", "cpu"), paths)
    on_gpu = embed_images(load_embedder(tmp_path / "run", "cuda"), paths)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-3)


def test_evaluation_on_cuda_equals_the_cpu():  # pragma: no cover - no GPU on the development machines
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 300, 3000)
    x = (rng.standard_normal((300, 64))[labels] + 0.7 * rng.standard_normal((3000, 64))).astype(np.float32)
    cpu = evaluate_embeddings(x, labels, ks=(1, 10, 100), nmi=False)
    gpu = evaluate_embeddings(torch.from_numpy(x).cuda(), labels, ks=(1, 10, 100), nmi=False)
    assert gpu["float"] == cpu["float"] and gpu["binary"] == cpu["binary"]
