import math

import numpy as np
import pytest
import torch

from normsoftmax import NormSoftmaxLoss


def reference_loss_and_grads(embeddings, proxies, labels, temperature):
    """Float64 hand computation of the loss and its gradients w.r.t. embeddings and proxies."""
    e = embeddings.astype(np.float64)
    p = proxies.astype(np.float64)
    e_norm = np.linalg.norm(e, axis=1, keepdims=True)
    p_norm = np.linalg.norm(p, axis=1, keepdims=True)
    e_hat, p_hat = e / e_norm, p / p_norm
    logits = e_hat @ p_hat.T / temperature
    shifted = logits - logits.max(axis=1, keepdims=True)
    softmax = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.mean(np.log(softmax[np.arange(n), labels]))
    d_logits = softmax.copy()
    d_logits[np.arange(n), labels] -= 1
    d_logits /= n
    d_e_hat = d_logits @ p_hat / temperature
    d_p_hat = d_logits.T @ e_hat / temperature
    # d(x/|x|)/dx = (I - x̂x̂ᵀ)/|x|
    d_e = (d_e_hat - (d_e_hat * e_hat).sum(1, keepdims=True) * e_hat) / e_norm
    d_p = (d_p_hat - (d_p_hat * p_hat).sum(1, keepdims=True) * p_hat) / p_norm
    return loss, d_e, d_p


def test_loss_and_gradients_match_float64_hand_computation():
    torch.manual_seed(0)
    criterion = NormSoftmaxLoss(num_classes=7, dim=16, temperature=0.05)
    embeddings = torch.randn(10, 16, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    loss = criterion(embeddings, labels)
    loss.backward()
    expected, d_e, d_p = reference_loss_and_grads(embeddings.detach().numpy(), criterion.proxies.detach().numpy(),
                                                  labels.numpy(), 0.05)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(embeddings.grad.numpy(), d_e, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(criterion.proxies.grad.numpy(), d_p, rtol=1e-3, atol=1e-5)


def test_temperature_scales_logits():
    torch.manual_seed(1)
    criterion = NormSoftmaxLoss(5, 8, temperature=0.1)
    embeddings = torch.randn(3, 8)
    cosines = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(criterion.proxies,
                                                                                               dim=1).T
    torch.testing.assert_close(criterion.logits(embeddings), cosines / 0.1)


def test_single_parameter_is_the_proxy_matrix_initialised_uniformly():
    torch.manual_seed(2)
    criterion = NormSoftmaxLoss(num_classes=300, dim=64)
    parameters = list(criterion.parameters())
    assert len(parameters) == 1 and parameters[0] is criterion.proxies
    assert criterion.proxies.shape == (300, 64)
    bound = 1 / math.sqrt(64)
    values = criterion.proxies.detach()
    assert values.abs().max() <= bound
    # uniform on [-b, b] has standard deviation b/sqrt(3)
    assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_class_subsampling_scores_batch_classes_plus_a_fraction():
    torch.manual_seed(3)
    criterion = NormSoftmaxLoss(num_classes=1000, dim=8, class_sample_fraction=0.05)
    labels = torch.tensor([5, 5, 17, 900, 17])
    classes, targets = criterion.sample_classes(labels)
    assert set(classes[:3].tolist()) == {5, 17, 900}
    assert len(classes) == 3 + round(0.05 * 997)
    assert len(set(classes.tolist())) == len(classes)
    assert classes[targets].tolist() == labels.tolist()


def test_class_subsampling_with_fraction_one_equals_full_loss():
    torch.manual_seed(4)
    full = NormSoftmaxLoss(num_classes=20, dim=8)
    sampled = NormSoftmaxLoss(num_classes=20, dim=8, class_sample_fraction=1.0)
    sampled.load_state_dict(full.state_dict())
    embeddings = torch.randn(6, 8)
    labels = torch.tensor([1, 1, 4, 9, 19, 0])
    assert sampled(embeddings, labels).item() == pytest.approx(full(embeddings, labels).item(), rel=1e-5)


def test_class_subsampling_is_off_in_eval_mode():
    torch.manual_seed(5)
    criterion = NormSoftmaxLoss(num_classes=50, dim=8, class_sample_fraction=0.1)
    embeddings, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    criterion.eval()
    expected = torch.nn.functional.cross_entropy(criterion.logits(embeddings), labels)
    assert criterion(embeddings, labels).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("kwargs", [dict(num_classes=1, dim=4), dict(num_classes=3, dim=4, temperature=0),
                                    dict(num_classes=3, dim=4, class_sample_fraction=1.5)])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        NormSoftmaxLoss(**kwargs)
