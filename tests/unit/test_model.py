import pytest
import torch

from normsoftmax import create_embedder
from normsoftmax.model import (
    EmbeddingHead,
    available_backbones,
    create_backbone,
    register_backbone,
)


def test_head_is_pool_layernorm_without_affine_projection_and_l2():
    head = EmbeddingHead(width=16, dim=8)
    assert head.standardize.elementwise_affine is False
    assert list(head.standardize.parameters()) == []
    assert head.projection.bias is None
    features = torch.randn(4, 16, 3, 3)
    pooled = features.mean(dim=(2, 3))
    variance = pooled.var(1, unbiased=False, keepdim=True)
    standardized = (pooled - pooled.mean(1, keepdim=True)) / torch.sqrt(variance + 1e-5)
    expected = torch.nn.functional.normalize(standardized @ head.projection.weight.T, dim=1)
    torch.testing.assert_close(head(features), expected, rtol=1e-4, atol=1e-5)


def test_projection_only_when_dim_differs_from_width():
    assert EmbeddingHead(width=16, dim=16).projection is None
    model = create_embedder("resnet18", dim=512, weights="none")
    assert model.head.projection is None and model.new_parameters() == []
    model = create_embedder("resnet18", dim=64, weights="none")
    assert model.head.projection.weight.shape == (64, 512)
    assert [p.shape for p in model.new_parameters()] == [torch.Size([64, 512])]


def test_embeddings_have_unit_norm():
    torch.manual_seed(0)
    model = create_embedder("resnet18", dim=32, weights="none").eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_registry_names_and_unknown_backbone():
    assert {"resnet18", "resnet50", "resnet101"} <= set(available_backbones())
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("no_such_net_xyz", pretrained=False)


def test_register_backbone_makes_a_new_name_available():
    @register_backbone("tiny_test_net")
    def tiny(pretrained):
        return torch.nn.Conv2d(3, 6, 3), 6

    model = create_embedder("tiny_test_net", dim=4, weights="none")
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_bad_weights_argument():
    with pytest.raises(ValueError, match="imagenet"):
        create_embedder("resnet18", dim=16, weights="/no/such/file.pth")


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_timm_model_names_work_when_timm_is_installed(name):
    pytest.importorskip("timm")
    model = create_embedder(name, dim=8, weights="none").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 160, 160))
    assert out.shape == (2, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
