"""Weights files as users have them: every form loads completely into the backbone, or the run stops naming
what does not fit (normsoftmax.weights, normsoftmax.model.load_weights)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from fixtures import TINY, write_cub200
from normsoftmax import create_embedder
from normsoftmax.model import PretrainedWeightsUnavailable, backbone_preprocessing
from normsoftmax.weights import WeightsMismatchError, best_prefix, read_state_dict

timm = pytest.importorskip("timm")


def _random_like(state: dict) -> dict:
    """The same keys and shapes with values no initialisation produces, so a load is visible."""
    generator = torch.Generator().manual_seed(7)
    return {key: (torch.rand(value.shape, generator=generator) + 3.0).to(value.dtype)
            if value.is_floating_point() else value.clone() for key, value in state.items()}


@pytest.fixture(scope="module")
def timm_lite0_state():
    """A full timm ``tf_efficientnet_lite0`` state dict, classifier included: the issue's case."""
    return _random_like(timm.create_model("tf_efficientnet_lite0").state_dict())


@pytest.fixture(scope="module")
def torchvision_r18_state():
    return _random_like(torchvision.models.resnet18(weights=None).state_dict())


def _backbone_state(model) -> dict:
    trunk = model.backbone
    return (trunk.model if hasattr(trunk, "weights_module") else trunk).state_dict()


def _assert_loaded(model, source: dict) -> None:
    own = _backbone_state(model)
    for key, value in own.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(value, source[key]), key


WRAPPERS = {
    "plain": lambda state: state,
    "module.": lambda state: {f"module.{k}": v for k, v in state.items()},
    "model.": lambda state: {f"model.{k}": v for k, v in state.items()},
    "backbone.": lambda state: {f"backbone.{k}": v for k, v in state.items()},
    "encoder.": lambda state: {f"encoder.{k}": v for k, v in state.items()},
    "module.encoder.": lambda state: {f"module.encoder.{k}": v for k, v in state.items()},
    "checkpoint state_dict": lambda state: {"epoch": 90, "state_dict": state, "optimizer": {"lr": 0.1}},
    "checkpoint model": lambda state: {"model": {f"module.{k}": v for k, v in state.items()}, "args": "x"},
    "checkpoint ema": lambda state: {"ema": state, "step": 3},
}


@pytest.mark.parametrize("form", sorted(WRAPPERS))
@pytest.mark.parametrize("source", ["timm tf_efficientnet_lite0", "torchvision resnet18"])
def test_every_form_loads_every_backbone_tensor(tmp_path, caplog, form, source, timm_lite0_state,
                                                torchvision_r18_state):
    name, state = (("tf_efficientnet_lite0", timm_lite0_state) if source.startswith("timm")
                   else ("resnet18", torchvision_r18_state))
    path = tmp_path / "weights.pth"
    torch.save(WRAPPERS[form](state), path)
    with caplog.at_level(logging.INFO, logger="normsoftmax"):
        model = create_embedder(name, dim=16, weights=str(path))
    _assert_loaded(model, state)
    total = sum(not key.endswith("num_batches_tracked") for key in _backbone_state(model))
    assert f"loaded {total} of {total} {name} backbone tensors" in caplog.text
    classifier = "classifier.weight" if name.startswith("tf_") else "fc.weight"
    assert "not part of the" in caplog.text and classifier in caplog.text  # the classifier: ignored, said so


def test_safetensors_files_load(tmp_path, timm_lite0_state):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm_lite0_state.items()}, str(path))
    model = create_embedder("tf_efficientnet_lite0", dim=16, weights=str(path))
    _assert_loaded(model, timm_lite0_state)


def test_a_normsoftmax_embedder_state_loads_its_head_too(tmp_path):
    torch.manual_seed(3)
    trained = create_embedder("resnet18", dim=16, weights="none")
    path = tmp_path / "embedder.pt"
    torch.save({"format": 1, "model": trained.state_dict()}, path)
    model = create_embedder("resnet18", dim=16, weights=str(path))
    assert torch.equal(model.head.projection.weight, trained.head.projection.weight)
    _assert_loaded(model, _backbone_state(trained))
    other_dim = create_embedder("resnet18", dim=8, weights=str(path))  # the head does not fit: it starts new
    _assert_loaded(other_dim, _backbone_state(trained))


def test_a_missing_tensor_stops_the_load_naming_it_unless_partial(tmp_path, caplog, timm_lite0_state):
    state = {f"model.{k}": v for k, v in timm_lite0_state.items() if k != "blocks.1.0.conv_pw.weight"}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match=r"1 of \d+ tf_efficientnet_lite0 backbone tensors are not in "
                                                   r"the file \(blocks.1.0.conv_pw.weight\).*--weights_partial"):
        create_embedder("tf_efficientnet_lite0", dim=16, weights=str(path))
    with caplog.at_level(logging.WARNING, logger="normsoftmax"):
        model = create_embedder("tf_efficientnet_lite0", dim=16, weights=str(path), weights_partial=True)
    assert "--weights_partial" in caplog.text and "blocks.1.0.conv_pw.weight" in caplog.text
    assert torch.equal(model.backbone.model.conv_stem.weight, timm_lite0_state["conv_stem.weight"])


def test_a_shape_mismatch_stops_the_load(tmp_path, torchvision_r18_state):
    state = dict(torchvision_r18_state)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match=r"1 have another shape \(layer1.0.conv1.weight: file "
                                                   r"\(64, 64, 5, 5\), resnet18 backbone \(64, 64, 3, 3\)\)"):
        create_embedder("resnet18", dim=16, weights=str(path))
    model = create_embedder("resnet18", dim=16, weights=str(path), weights_partial=True)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])


def test_another_architecture_is_refused_even_when_partial(tmp_path, torchvision_r18_state):
    path = tmp_path / "r18.pth"
    torch.save(torchvision_r18_state, path)
    with pytest.raises(WeightsMismatchError, match="does not fit the resnet50 backbone"):
        create_embedder("resnet50", dim=8, weights=str(path))
    with pytest.raises(WeightsMismatchError, match="none of its .* tensors fits"):
        create_embedder("tf_efficientnet_lite0", dim=8, weights=str(path), weights_partial=True)


def test_files_without_tensors_are_clear_errors(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="garbage.pt: cannot be read as a state dict"):
        read_state_dict(tmp_path / "garbage.pt")
    torch.save({"epoch": 3, "notes": "no weights"}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="empty.pt: holds no tensors by name"):
        read_state_dict(tmp_path / "empty.pt")


def test_best_prefix_prefers_the_one_that_names_the_most_keys():
    expected = {"conv.weight", "bn.bias"}
    assert best_prefix(["module.backbone.conv.weight", "module.backbone.bn.bias", "module.head.w"],
                       expected) == "module.backbone."
    assert best_prefix(["conv.weight", "bn.bias"], expected) == ""


def test_the_cli_stops_with_exit_2_on_a_timm_file_that_does_not_fit(tmp_path, cli, timm_lite0_state):
    root = write_cub200(tmp_path / "data", num_classes=4, images_per_class=4)
    state = {k: v for k, v in timm_lite0_state.items() if not k.startswith("blocks.6")}
    torch.save(state, tmp_path / "lite0.pth")
    args = list(TINY)
    args[args.index("--model_name") + 1] = "tf_efficientnet_lite0"
    args[args.index("--weights") + 1] = str(tmp_path / "lite0.pth")
    code, _, err = cli("train", "--dataset", "Cub200", "--dataset_root", root, "--run_dir", tmp_path / "run", *args)
    assert code == 2 and "tensors are not in the file (blocks.6.0." in err and "--weights_partial" in err
    assert "Traceback" not in err


def test_backbones_bring_their_own_normalisation():
    assert backbone_preprocessing("resnet50").mean == (0.485, 0.456, 0.406)
    lite0 = backbone_preprocessing("tf_efficientnet_lite0")
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5) and lite0.input_size == 224
    assert backbone_preprocessing("vit_base_patch16_384").input_size == 384


# ------------------------------------------------------------------------------------ --weights imagenet offline
def test_imagenet_weights_without_internet_name_the_file_and_use_a_cached_copy(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    import torch.hub

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    target = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(PretrainedWeightsUnavailable) as caught:
        create_embedder("resnet18", dim=16, weights="imagenet")
    message = str(caught.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message and str(target) in message
    assert "--weights PATH" in message
    cached = _random_like(torchvision.models.resnet18(weights=None).state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cached, target)
    model = create_embedder("resnet18", dim=16, weights="imagenet")  # from the cache, no network
    _assert_loaded(model, cached)


_HF_SCRIPT = textwrap.dedent("""
    import sys
    from normsoftmax import create_embedder
    from normsoftmax.model import PretrainedWeightsUnavailable
    try:
        model = create_embedder("tf_efficientnet_lite0", dim=16, weights="imagenet")
    except PretrainedWeightsUnavailable as error:
        print("UNAVAILABLE", error)
        sys.exit(0)
    print("LOADED", float(model.backbone.model.conv_stem.weight.flatten()[0]))
""")


def test_timm_weights_without_internet_name_the_hub_file_and_use_the_hugging_face_cache(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "TORCH_HOME": str(tmp_path / "torch")}
    first = subprocess.run([sys.executable, "-c", _HF_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    hub_file = "https://huggingface.co/timm/tf_efficientnet_lite0.in1k/resolve/main/model.safetensors"
    assert "UNAVAILABLE" in first.stdout and hub_file in first.stdout and "--weights PATH" in first.stdout
    assert str(tmp_path / "hf" / "hub" / "models--timm--tf_efficientnet_lite0.in1k") in first.stdout
    # The layout huggingface_hub keeps: refs/main names a snapshot that holds the file.
    repo = tmp_path / "hf" / "hub" / "models--timm--tf_efficientnet_lite0.in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    state = _random_like(timm.create_model("tf_efficientnet_lite0").state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    second = subprocess.run([sys.executable, "-c", _HF_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["LOADED", str(float(state["conv_stem.weight"].flatten()[0]))]
