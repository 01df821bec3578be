"""Losses against independent references written differently: Python loops, numpy, math.log."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlpt.config import TrainConfig, load_config
from vlpt.losses import (
    LOSSES,
    PAIRWISE_NEGATIVES,
    SIGLIP_EXCHANGES,
    binary_matching_loss,
    check_pairwise_options,
    gather_features,
    get_loss,
    get_siglip_loss,
    hard_negatives,
    infonce_loss,
    pairwise_loss,
    pairwise_matching_loss,
    random_negatives,
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


def _ref_pairwise(img: np.ndarray, txt: np.ndarray, scale: float, bias: float,
                  neg_texts: list[list[int]], neg_images: list[list[int]]) -> float:
    """BCE by hand over the matched pairs (label 1), each image's negative texts and each text's
    negative images (label 0): one mean over all of them."""
    logits, labels = [], []
    for i in range(img.shape[0]):
        logits.append(scale * float(np.dot(img[i], txt[i])) + bias)
        labels.append(1.0)
        for j in neg_texts[i]:  # image i against text j
            logits.append(scale * float(np.dot(img[i], txt[j])) + bias)
            labels.append(0.0)
    for j in range(txt.shape[0]):
        for i in neg_images[j]:  # text j against image i
            logits.append(scale * float(np.dot(img[i], txt[j])) + bias)
            labels.append(0.0)
    return _ref_bce(logits, labels)


def _ref_hardest(sim: np.ndarray, k: int) -> list[list[int]]:
    """Row i's k most similar columns other than i, by a plain sort."""
    n = sim.shape[0]
    return [sorted((j for j in range(n) if j != i), key=lambda j: -sim[i, j])[:k] for i in range(n)]


@pytest.mark.parametrize("k", [1, 3])
def test_pairwise_loss_matches_reference_with_hard_negatives(k):
    img, txt = _features(b=5)
    scale, bias = 7.0, -2.0
    got = pairwise_loss(img, txt, torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64),
                        num_negatives=k, negatives="hard")
    sim = img.numpy() @ txt.numpy().T  # (B, B): sim[i, j] = cos(image i, text j)
    neg_texts = _ref_hardest(sim, k)  # for image i: the texts most like it
    neg_images = _ref_hardest(sim.T, k)  # for text j: the images most like it
    want = _ref_pairwise(img.numpy(), txt.numpy(), scale, bias, neg_texts, neg_images)
    assert got.item() == pytest.approx(want, rel=1e-12)
    if k == 1:  # the hardest negatives are the argmax non-matching text (image) of each image (text)
        masked = np.where(np.eye(5, dtype=bool), -np.inf, sim)
        assert [row[0] for row in neg_texts] == masked.argmax(axis=1).tolist()
        assert [row[0] for row in neg_images] == masked.argmax(axis=0).tolist()


@pytest.mark.parametrize("k", [1, 3])
def test_pairwise_loss_matches_reference_with_random_negatives(k):
    img, txt = _features(b=6)
    scale, bias = 5.0, -1.5
    got = pairwise_loss(img, txt, torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64),
                        num_negatives=k, negatives="random", generator=torch.Generator().manual_seed(11))
    # The documented draw: from the same generator state, the images' texts, then the texts' images.
    g = torch.Generator().manual_seed(11)
    neg_texts = random_negatives(6, k, g).tolist()
    neg_images = random_negatives(6, k, g).tolist()
    assert neg_texts != neg_images  # two independent draws, not one reused
    want = _ref_pairwise(img.numpy(), txt.numpy(), scale, bias, neg_texts, neg_images)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_pairwise_random_negatives_are_deterministic_given_the_generator():
    img, txt = _features(b=8)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)

    def loss(generator):
        return pairwise_loss(img, txt, scale, bias, num_negatives=2, negatives="random", generator=generator).item()

    assert loss(torch.Generator().manual_seed(3)) == loss(torch.Generator().manual_seed(3))
    assert loss(torch.Generator().manual_seed(3)) != loss(torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(3)
    first, second = loss(g), loss(g)
    assert first != second  # the generator advances: every step draws new negatives
    g = torch.Generator().manual_seed(3)
    loss(g)
    state = g.get_state()  # what the trainer checkpoints; restoring it replays the next draw
    assert loss(torch.Generator().set_state(state)) == second


def test_random_negatives_are_uniform_without_replacement():
    n, k, draws = 5, 2, 3000
    g = torch.Generator().manual_seed(0)
    pair_counts = np.zeros((n, n))
    subset_counts: dict[tuple[int, int], int] = {}
    for _ in range(draws):
        idx = random_negatives(n, k, g)
        assert idx.shape == (n, k) and idx.dtype == torch.int64
        for i, row in enumerate(idx.tolist()):
            assert i not in row and len(set(row)) == k
            pair_counts[i, row] += 1
            if i == 0:
                key = tuple(sorted(row))
                subset_counts[key] = subset_counts.get(key, 0) + 1
    expected = draws * k / (n - 1)  # each of the n - 1 others equally likely
    off_diagonal = pair_counts[~np.eye(n, dtype=bool)]
    assert np.abs(off_diagonal / expected - 1).max() < 0.1
    assert len(subset_counts) == 6  # C(4, 2) sets, each about draws / 6 times
    assert max(abs(c / (draws / 6) - 1) for c in subset_counts.values()) < 0.2


def test_hard_negatives_of_a_rank_block_are_its_rows_of_the_global_choice():
    g = torch.Generator().manual_seed(2)
    sim = torch.randn(12, 12, generator=g, dtype=torch.float64)  # a global batch of 12 = 3 ranks x 4
    full = hard_negatives(sim, 3)
    for rank in range(3):
        rows = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(hard_negatives(sim[rows], 3, offset=4 * rank), full[rows])
    with pytest.raises(ValueError, match="offset"):
        hard_negatives(sim[:4], 3, offset=9)


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


def test_pairwise_options_are_validated():
    assert PAIRWISE_NEGATIVES == ("random", "hard")
    with pytest.raises(ValueError) as err:
        check_pairwise_options("hardest", 1)
    assert "hardest" in str(err.value) and "random" in str(err.value) and "hard" in str(err.value)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_negatives"):
            check_pairwise_options("random", bad)
    check_pairwise_options("hard", 7, batch_size=8)
    with pytest.raises(ValueError, match="num_negatives must be in 1..7"):
        check_pairwise_options("hard", 8, batch_size=8)
    img, txt = _features(b=4)
    one = torch.tensor(1.0, dtype=torch.float64)
    for negatives in PAIRWISE_NEGATIVES:  # negatives come from the other 3 pairs of the batch
        with pytest.raises(ValueError, match="num_negatives"):
            pairwise_loss(img, txt, one, one, num_negatives=4, negatives=negatives)
    with pytest.raises(ValueError, match="pairwise_negatives"):
        pairwise_loss(img, txt, one, one, negatives="semi-hard")
    with pytest.raises(ValueError, match="generator"):  # ranks could not agree on the default generator's draw
        pairwise_loss(img, txt, one, one, negatives="random", rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="process group"):
        pairwise_loss(img, txt, one, one, negatives="hard", rank=0, world_size=2)


def test_contrastive_task_passes_pairwise_options_to_the_loss():
    img, txt = _features(b=6)
    scale, bias = torch.tensor(6.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    for negatives, k in (("random", 1), ("random", 3), ("hard", 2)):
        task = ContrastiveTask(_BiasOnly(), "pairwise", seed=5, pairwise_negatives=negatives, num_negatives=k)
        got = task.loss_from_features(img, txt, scale, bias)
        want = pairwise_loss(img, txt, scale, bias, num_negatives=k, negatives=negatives,
                             generator=torch.Generator().manual_seed(5))
        assert got.item() == want.item()
    default = ContrastiveTask(_BiasOnly(), "pairwise", seed=5)  # callers that pass neither: random, 1
    assert (default.pairwise_negatives, default.num_negatives) == ("random", 1)
    for loss in ("pairwise", "infonce"):  # a bad option fails early, whatever the loss
        with pytest.raises(ValueError, match="pairwise_negatives"):
            ContrastiveTask(_BiasOnly(), loss, pairwise_negatives="easy")
        with pytest.raises(ValueError, match="num_negatives"):
            ContrastiveTask(_BiasOnly(), loss, num_negatives=0)


def test_train_config_pairwise_fields():
    config = TrainConfig()
    assert (config.pairwise_negatives, config.num_negatives) == ("random", 1)
    loaded = load_config("tiny-shapes", ["train.pairwise_negatives=hard", "train.num_negatives=4"])
    assert (loaded.train.pairwise_negatives, loaded.train.num_negatives) == ("hard", 4)


# ----------------------------------------------------------------------------- all losses

def _call(name, img, txt, scale, bias):
    if name == "infonce":
        return infonce_loss(img, txt, scale)
    if name == "siglip":
        return siglip_loss(img, txt, scale, bias)
    return pairwise_loss(img, txt, scale, bias, num_negatives=2, negatives="random",
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
