"""A backbone's own input normalisation, end to end: an EfficientNet-Lite run (mean = std = 0.5, not ImageNet's)
records it, trains with it, and embed and the exported ONNX model apply it too."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from fixtures import tiny_config, write_cub200
from normsoftmax import train_embedder
from normsoftmax.checkpoint import load_embedder
from normsoftmax.config import EmbedConfig, ExportConfig, TrainConfig
from normsoftmax.data.images import ImageTransformConfig, train_transform
from normsoftmax.embedding import embed_files
from normsoftmax.embedding.files import read_embeddings
from normsoftmax.export import export_embedder
from normsoftmax.training.recipe import resolve_inputs

pytest.importorskip("timm")
HALF = [0.5, 0.5, 0.5]


def test_an_unset_normalisation_and_size_resolve_to_the_backbones():
    lite0 = resolve_inputs(TrainConfig(model_name="tf_efficientnet_lite0"))
    assert (lite0.mean, lite0.std, lite0.crop, lite0.resize) == (HALF, HALF, 224, 256)
    resnet = resolve_inputs(TrainConfig(model_name="resnet50"))
    assert (resnet.mean, resnet.crop, resnet.resize) == ([0.485, 0.456, 0.406], 224, 256)  # the paper's geometry
    vit = resolve_inputs(TrainConfig(model_name="vit_base_patch16_384"))
    assert (vit.crop, vit.resize, vit.mean) == (384, 439, HALF)
    given = resolve_inputs(TrainConfig(model_name="tf_efficientnet_lite0", mean=[0.1, 0.2, 0.3], std=[1, 1, 1],
                                       crop=64, resize=72))
    assert (given.mean, given.std, given.crop, given.resize) == ([0.1, 0.2, 0.3], [1, 1, 1], 64, 72)


@pytest.fixture(scope="module")
def lite0_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lite0")
    root = write_cub200(folder / "data", num_classes=8, images_per_class=4)
    config = tiny_config(root, folder / "run", model_name="tf_efficientnet_lite0", dim=8, num_steps=1,
                         epochs_per_step=1, pretrain_epochs=1, test_every_n_epochs=1, resize=40, crop=32)
    train_embedder(config)
    return folder, folder / "run"


def _by_hand(path, mean, std) -> torch.Tensor:
    """The evaluation input of one image, normalised with the given statistics."""
    steps = transforms.Compose([transforms.Resize((40, 40)), transforms.CenterCrop(32), transforms.ToTensor(),
                                transforms.Normalize(mean, std)])
    return steps(Image.open(path).convert("RGB"))[None]


def test_the_run_records_and_trains_with_the_backbones_normalisation(lite0_run):
    _, run = lite0_run
    stored = json.loads((run / "config.json").read_text())
    assert stored["mean"] == HALF and stored["std"] == HALF and (stored["resize"], stored["crop"]) == (40, 32)
    assert "normalised with mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in (run / "train.log").read_text()
    # the recipe's training transform, from the stored config: white maps to (1 - 0.5) / 0.5 = 1, black to -1
    transform = train_transform(ImageTransformConfig.of(TrainConfig(**stored)))
    white = transform(Image.new("RGB", (50, 50), (255, 255, 255)))
    black = transform(Image.new("RGB", (50, 50), (0, 0, 0)))
    assert torch.equal(white, torch.ones_like(white)) and torch.equal(black, -torch.ones_like(black))


def test_embed_and_the_exported_onnx_model_normalise_the_same_way(lite0_run):
    import onnx
    import onnxruntime

    folder, run = lite0_run
    images = folder / "queries"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)).save(images / f"q{index}.png")
    embed_files(EmbedConfig(checkpoint=str(run), images=str(images), out=str(folder / "q.npz"), workers=0,
                            progress=False))
    embedded = read_embeddings(folder / "q.npz")
    model = load_embedder(run)
    with torch.no_grad():
        half = torch.cat([_by_hand(path, HALF, HALF) for path in embedded.paths])
        imagenet = torch.cat([_by_hand(path, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) for path in embedded.paths])
        expected, other = model(half).numpy(), model(imagenet).numpy()
    np.testing.assert_allclose(embedded.embeddings, expected, atol=1e-5)
    assert np.abs(embedded.embeddings - other).max() > 1e-2  # the checks can tell the two normalisations apart

    result = export_embedder(ExportConfig(checkpoint=str(run), format="onnx", out=str(folder / "lite0.onnx")))
    metadata = {entry.key: entry.value for entry in onnx.load(result["path"]).metadata_props}
    assert json.loads(metadata["mean"]) == HALF and json.loads(metadata["std"]) == HALF
    session = onnxruntime.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: half.numpy()})[0]
    # onnxruntime's kernels round differently (the export itself is checked to 1e-4 on its sample images)
    np.testing.assert_allclose(onnx_out, embedded.embeddings, atol=1e-3)
