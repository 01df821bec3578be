"""Losses against independent references written differently: Python loops, numpy, math.log."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlpt.losses import (
    LOSSES,
    SIGLIP_EXCHANGES,
    binary_matching_loss,
    gather_features,
    get_loss,
    get_siglip_loss,
    infonce_loss,
    pairwise_loss,
    pairwise_matching_loss,
    sample_negatives,
    siglip_loss,
    siglip_neighbour_loss,
)
from vlpt.tasks.contrastive import ContrastiveTask


def _features(b: int = 6, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- references

def _ref_infonce(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    """Log-softmax by hand, one row at a time, both directions."""
    b = img.shape[0]
    sim = [[scale * float(np.dot(img[i], txt[j])) for j in range(b)] for i in range(b)]
    i2t = 0.0
    for i in range(b):
        row = sim[i]
        m = max(row)
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        i2t += -(row[i] - log_z)
    t2i = 0.0
    for j in range(b):
        col = [sim[i][j] for i in range(b)]
        m = max(col)
        log_z = m + math.log(sum(math.exp(v - m) for v in col))
        t2i += -(col[j] - log_z)
    return 0.5 * (i2t / b + t2i / b)


def _ref_siglip(img: np.ndarray, txt: np.ndarray, scale: float, bias: float) -> float:
    b = img.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            logit = scale * float(np.dot(img[i], txt[j])) + bias
            total += math.log(_sigmoid(z * logit))
    return -total / b


def _ref_bce(logits: list[float], labels: list[float]) -> float:
    total = 0.0
    for x, y in zip(logits, labels):
        p = _sigmoid(x)
        total += y * math.log(p) + (1 - y) * math.log(1 - p)
    return -total / len(logits)


# ----------------------------------------------------------------------------- InfoNCE

@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_infonce_matches_reference(scale):
    img, txt = _features()
    got = infonce_loss(img, txt, torch.tensor(scale, dtype=torch.float64))
    want = _ref_infonce(img.numpy(), txt.numpy(), scale)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_infonce_local_loss_flag_is_noop_single_process():
    img, txt = _features()
    scale = torch.tensor(10.0, dtype=torch.float64)
    a = infonce_loss(img, txt, scale, local_loss=False)
    b = infonce_loss(img, txt, scale, local_loss=True)
    assert torch.allclose(a, b)


# ----------------------------------------------------------------------------- SigLIP

@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1.0, 0.0), (30.0, -5.0)])
def test_siglip_matches_reference(scale, bias):
    img, txt = _features(b=5)
    got = siglip_loss(img, txt, torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64))
    want = _ref_siglip(img.numpy(), txt.numpy(), scale, bias)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_siglip_neighbour_single_process_is_the_local_loss():
    img, txt = _features(b=5)
    img, txt = img.requires_grad_(), txt.requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    got = siglip_neighbour_loss(img, txt, scale, bias)
    assert got.item() == pytest.approx(_ref_siglip(img.detach().numpy(), txt.detach().numpy(), 10.0, -10.0), rel=1e-9)
    got_grads = torch.autograd.grad(got, (img, txt, scale, bias))
    want_grads = torch.autograd.grad(siglip_loss(img, txt, scale, bias), (img, txt, scale, bias))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_siglip_neighbour_needs_a_process_group():
    img, txt = _features()
    with pytest.raises(RuntimeError, match="process group"):
        siglip_neighbour_loss(img, txt, torch.tensor(1.0), torch.tensor(0.0), rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        siglip_neighbour_loss(img, txt, torch.tensor(1.0), torch.tensor(0.0), rank=2, world_size=2)


class _BiasOnly(torch.nn.Module):
    """Just enough model for ContrastiveTask's constructor checks."""

    def __init__(self):
        super().__init__()
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))


def test_siglip_exchange_choice_and_unknown_name():
    assert get_siglip_loss("gather") is siglip_loss
    assert get_siglip_loss("neighbour") is siglip_neighbour_loss
    assert ContrastiveTask(_BiasOnly(), "siglip", siglip_exchange="neighbour").loss_fn is siglip_neighbour_loss
    assert ContrastiveTask(_BiasOnly(), "siglip").loss_fn is siglip_loss
    for loss in ("siglip", "infonce"):  # a typo fails even when the loss is not SigLIP
        with pytest.raises(ValueError) as err:
            ContrastiveTask(_BiasOnly(), loss, siglip_exchange="ring")
        assert "ring" in str(err.value) and all(name in str(err.value) for name in SIGLIP_EXCHANGES)


# ----------------------------------------------------------------------------- pairwise matching

def test_binary_matching_loss_matches_formula():
    logits = [2.0, -1.5, 0.3, -0.2, 4.0, -3.0]
    labels = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    got = binary_matching_loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64))
    assert got.item() == pytest.approx(_ref_bce(logits, labels), rel=1e-12)


def test_binary_matching_loss_is_stable_for_large_logits():
    logits = torch.tensor([200.0, -200.0, 200.0, -200.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = binary_matching_loss(logits, labels)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(100.0)  # (0 + 0 + 200 + 200) / 4


def test_pairwise_matching_loss_pos_neg():
    pos = [1.0, 2.0]
    neg = [-0.5, 0.5, 1.5]
    got = pairwise_matching_loss(torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64))
    want = _ref_bce(pos + neg, [1.0] * len(pos) + [0.0] * len(neg))
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_pairwise_loss_matches_reference_with_hard_negatives(k):
    img, txt = _features(b=5)
    scale, bias = 7.0, -2.0
    got = pairwise_loss(img, txt, torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64),
                        num_negatives=k, hard=True)
    sim = img.numpy() @ txt.numpy().T
    logits, labels = [], []
    for i in range(5):
        logits.append(scale * sim[i, i] + bias)
        labels.append(1.0)
        wrong = sorted((j for j in range(5) if j != i), key=lambda j: -sim[i, j])[:k]
        for j in wrong:
            logits.append(scale * sim[i, j] + bias)
            labels.append(0.0)
    assert got.item() == pytest.approx(_ref_bce(logits, labels), rel=1e-9)


def test_hard_negatives_are_highest_wrong_and_never_positive():
    g = torch.Generator().manual_seed(1)
    b = 7
    sim = torch.randn(b, b, generator=g)
    sim.fill_diagonal_(10.0)  # the positive is the most similar: it must still never be picked
    idx = sample_negatives(sim, num_negatives=3, hard=True, generator=None)
    assert idx.shape == (b, 3) and idx.dtype == torch.int64
    for i in range(b):
        wrong = [j for j in range(b) if j != i]
        expected = sorted(wrong, key=lambda j: -sim[i, j].item())[:3]
        assert idx[i].tolist() == expected
        assert i not in idx[i].tolist()


def test_random_negatives_exclude_positive_and_are_reproducible():
    b, k = 8, 4
    sim = torch.randn(b, b)
    runs = [sample_negatives(sim, k, hard=False, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    for idx in runs:
        assert idx.shape == (b, k)
        for i in range(b):
            row = idx[i].tolist()
            assert i not in row
            assert len(set(row)) == k  # without replacement
            assert all(0 <= j < b for j in row)


def test_random_negatives_cover_all_wrong_columns():
    b = 4
    g = torch.Generator().manual_seed(0)
    seen = {i: set() for i in range(b)}
    for _ in range(50):
        idx = sample_negatives(torch.zeros(b, b), 1, hard=False, generator=g)
        for i in range(b):
            seen[i].add(int(idx[i, 0]))
    assert all(seen[i] == set(range(b)) - {i} for i in range(b))


def test_sample_negatives_rejects_too_many():
    with pytest.raises(ValueError, match="num_negatives"):
        sample_negatives(torch.zeros(3, 3), 3, hard=True)


# ----------------------------------------------------------------------------- all losses

def _call(name, img, txt, scale, bias):
    if name == "infonce":
        return infonce_loss(img, txt, scale)
    if name == "siglip":
        return siglip_loss(img, txt, scale, bias)
    return pairwise_loss(img, txt, scale, bias, num_negatives=2, hard=False,
                         generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_flow_to_both_inputs_and_temperature(name):
    img, txt = _features()
    img = img.float().requires_grad_()
    txt = txt.float().requires_grad_()
    scale = torch.tensor(5.0, requires_grad=True)
    bias = torch.tensor(-1.0, requires_grad=True)
    loss = _call(name, img, txt, scale, bias)
    loss.backward()
    for t in (img, txt, scale):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    if name != "infonce":
        assert bias.grad is not None and bias.grad.abs() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_perfect_alignment_beats_random(name):
    img, txt = _features(b=8, d=16)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-5.0, dtype=torch.float64)
    # Orthonormal rows: each image matches its own text exactly and no other.
    aligned = torch.eye(8, 16, dtype=torch.float64)
    perfect = _call(name, aligned, aligned.clone(), scale, bias)
    random = _call(name, img, txt, scale, bias)
    assert perfect.item() < random.item()


def test_world_size_one_gather_is_passthrough():
    img, txt = _features()
    all_img, all_txt = gather_features(img, txt, rank=0, world_size=1)
    assert all_img is img and all_txt is txt


def test_mismatched_feature_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        infonce_loss(torch.zeros(3, 4), torch.zeros(2, 4), torch.tensor(1.0))


def test_registry_and_unknown_name():
    assert get_loss("infonce") is infonce_loss
    assert get_loss("siglip") is siglip_loss
    assert get_loss("pairwise") is pairwise_loss
    with pytest.raises(ValueError) as err:
        get_loss("triplet")
    msg = str(err.value)
    assert "triplet" in msg
    for name in ("infonce", "siglip", "pairwise"):
        assert name in msg
