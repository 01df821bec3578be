"""Contrastive losses for dual encoders: InfoNCE (CLIP), sigmoid (SigLIP) and pairwise matching.

Every loss takes already L2-normalised features and the temperature the model returns; the model
never computes its loss. Losses take ``rank`` and ``world_size`` as plain arguments (no global
state), so the same call works in one process or under torchrun.

Distributed convention. DDP averages parameter gradients over ranks, and the autograd all-gather
(``torch.distributed.nn.functional.all_gather``) sums, in backward, the gradients every rank sends
to a rank's local features. Together, one step's effective objective is ``mean over ranks of the
per-rank loss``. Each loss below is normalised so that this mean equals the loss of a single
process on the global batch, so training with N ranks of batch B matches one process with batch
N * B. All ranks must use the same local batch size (all-gather needs equal shapes).
``siglip_neighbour_loss`` follows the same convention with point-to-point exchanges round a ring
of ranks instead of an all-gather (its backward sends each chunk's gradient back to its owner).
``pairwise_loss`` draws its negatives from the global batch (random ones from a generator every
rank holds in the same state, so the draw equals the single-process one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from vlpt.config import PAIRWISE_NEGATIVES
from vlpt.train.distributed import all_gather_with_grad


def _check_features(image_features: Tensor, text_features: Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image and text features must both be (B, D) with the same shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def _check_distributed(rank: int, world_size: int) -> None:
    """``rank`` / ``world_size`` describe a live process group (only called with world_size != 1)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            f"world_size={world_size} needs an initialised torch.distributed process group"
        )


def gather_features(
    image_features: Tensor,
    text_features: Tensor,
    rank: int,
    world_size: int,
    local_loss: bool = False,
) -> tuple[Tensor, Tensor]:
    """All-gather image and text features over ``torch.distributed``, keeping gradients.

    Returns ``(all_image, all_text)``, each (world_size * B, D), rank ``r``'s features at rows
    ``r*B : (r+1)*B``. With ``world_size == 1`` the inputs come back unchanged.

    ``local_loss`` is accepted for parity with OpenCLIP's ``gather_features``: there, without
    autograd in the gather, it decides whether the local slice is swapped back in to carry the
    gradient. The autograd all-gather used here always carries it, so the result does not depend
    on ``local_loss``.
    """
    del local_loss  # see docstring: no effect with an autograd all-gather
    if world_size == 1:
        return image_features, text_features
    _check_distributed(rank, world_size)
    return all_gather_with_grad(image_features, world_size), all_gather_with_grad(text_features, world_size)


# ----------------------------------------------------------------------------- InfoNCE (CLIP)

def infonce_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    rank: int = 0,
    world_size: int = 1,
    local_loss: bool = False,
) -> Tensor:
    """CLIP's symmetric InfoNCE: mean of image->text and text->image cross-entropy.

    ``image_features`` and ``text_features`` are (B, D), L2-normalised, row i of each a positive
    pair. ``logit_scale`` is the multiplier itself (CLIP's ``logit_scale.exp()``).

    With ``world_size > 1`` features are gathered with gradients. ``local_loss=False``: every rank
    computes the full global (N, N) matrix, N = world_size * B (same value on every rank).
    ``local_loss=True``: each rank computes only its own B rows against all N candidates, which
    is cheaper; the mean over ranks equals the global loss.
    """
    _check_features(image_features, text_features)
    all_image, all_text = gather_features(image_features, text_features, rank, world_size, local_loss)
    if world_size > 1 and local_loss:
        logits_per_image = logit_scale * image_features @ all_text.T  # (B, N)
        logits_per_text = logit_scale * text_features @ all_image.T  # (B, N)
        b = image_features.shape[0]
        labels = torch.arange(b, device=image_features.device) + rank * b  # (B,) positives' columns
    else:
        logits_per_image = logit_scale * all_image @ all_text.T  # (N, N)
        logits_per_text = logits_per_image.T  # (N, N)
        labels = torch.arange(all_image.shape[0], device=image_features.device)  # (N,)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


# ----------------------------------------------------------------------------- SigLIP

def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """Sigmoid loss of SigLIP (Zhai et al., 2023): every image-text pair is a binary problem.

    ``logits = logit_scale * I @ T.T + logit_bias``; labels are +1 on positive pairs and -1
    elsewhere; ``loss = -sum(logsigmoid(labels * logits)) / B`` with B the *local* batch size.

    With ``world_size > 1`` each rank scores its B images against the texts of all ranks
    (gathered with gradients), positives on the diagonal of its own block of columns. Dividing
    by the local B makes the mean over ranks equal ``-sum over all N*N pairs / N`` (N = global
    batch), i.e. exactly the single-process loss on the global batch; so DDP's averaged
    gradient (sum over ranks / world_size) equals the single-process gradient.
    """
    _check_features(image_features, text_features)
    b = image_features.shape[0]
    if world_size > 1:
        _, all_text = gather_features(image_features, text_features, rank, world_size)
    else:
        all_text = text_features
    logits = logit_scale * image_features @ all_text.T + logit_bias  # (B, N)
    # +1 where column j is image i's own caption (global column rank*B + i), -1 elsewhere.
    labels = -torch.ones_like(logits)  # (B, N)
    cols = torch.arange(b, device=logits.device) + rank * b
    labels[torch.arange(b, device=logits.device), cols] = 1.0
    return -F.logsigmoid(labels * logits).sum() / b


def _p2p_shift(x: Tensor, send_to: int, recv_from: int) -> Tensor:
    """Send ``x`` to rank ``send_to`` and return the tensor of the same shape from ``recv_from``."""
    x = x.contiguous()
    received = torch.empty_like(x)
    # Posted together, so no rank blocks in a send while its peer is itself still sending.
    ops = [dist.P2POp(dist.isend, x, send_to), dist.P2POp(dist.irecv, received, recv_from)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _RingShift(torch.autograd.Function):
    """Every rank sends its tensor to the next rank and gets the previous rank's.

    Forward: send to ``(rank + 1) % W``, receive from ``(rank - 1) % W``. The received tensor is
    the previous rank's, so its gradient belongs there: backward runs the same shift the other
    way (send the gradient to ``rank - 1``, receive the gradient of our own input from
    ``rank + 1``). Chained shifts thus carry each chunk's gradient hop by hop back to its owner.
    """

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, world_size: int) -> Tensor:
        ctx.rank, ctx.world_size = rank, world_size
        return _p2p_shift(x, send_to=(rank + 1) % world_size, recv_from=(rank - 1) % world_size)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        rank, world_size = ctx.rank, ctx.world_size
        return _p2p_shift(grad, send_to=(rank - 1) % world_size, recv_from=(rank + 1) % world_size), None, None


def siglip_neighbour_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """``siglip_loss`` with text chunks passed round a ring of ranks instead of all-gathered.

    Each rank first scores its B images against its own B texts (positives on the diagonal),
    then ``world_size - 1`` times passes the text chunk it holds to rank ``rank + 1`` and scores
    its images against the chunk it got from rank ``rank - 1`` (all negatives, label -1): after
    the k-th pass it holds the texts of rank ``rank - k``. The per-rank loss and its gradients
    equal ``siglip_loss`` with the all-gather (up to summation order), so the same normalisation
    argument holds: the mean over ranks is the single-process loss on the global batch.

    The shifts are point-to-point (``send`` / ``recv``, which gloo supports on CPU), one (B, D)
    chunk per rank and round, and no (N, D) gathered texts or (B, N) logits / labels matrix is
    built at once. With gradients on, autograd still keeps each received chunk and (B, B) block
    for backward, so what backward stores is the same as with the all-gather; the saving is in
    communication and transient buffers. With ``world_size == 1`` this is the plain
    single-process SigLIP loss.
    """
    _check_features(image_features, text_features)
    b = image_features.shape[0]
    logits = logit_scale * image_features @ text_features.T + logit_bias  # (B, B)
    labels = 2 * torch.eye(b, device=logits.device, dtype=logits.dtype) - 1  # +1 diagonal, -1 elsewhere
    loss = -F.logsigmoid(labels * logits).sum()
    if world_size == 1:
        return loss / b
    _check_distributed(rank, world_size)
    texts = text_features
    for _ in range(world_size - 1):
        texts = _RingShift.apply(texts, rank, world_size)  # (B, D) texts of rank (rank - k) % W
        logits = logit_scale * image_features @ texts.T + logit_bias  # (B, B), no positives
        loss = loss - F.logsigmoid(-logits).sum()
    return loss / b


# How a multi-process SigLIP loss reaches the other ranks' texts (TrainConfig.siglip_exchange).
SIGLIP_EXCHANGES: dict[str, Callable[..., Tensor]] = {
    "gather": siglip_loss,
    "neighbour": siglip_neighbour_loss,
}


def get_siglip_loss(exchange: str) -> Callable[..., Tensor]:
    """The SigLIP variant for ``exchange``; ValueError listing the choices otherwise."""
    return _choose(SIGLIP_EXCHANGES, exchange, "siglip_exchange")


def _choose(registry: dict[str, Callable[..., Tensor]], name: str, what: str) -> Callable[..., Tensor]:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose from {sorted(registry)}")
    return registry[name]


# ----------------------------------------------------------------------------- pairwise matching

def binary_matching_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``-mean[y log p + (1 - y) log(1 - p)]`` with ``p = sigmoid(logits)``, computed stably.

    ``logits`` and ``labels`` (0 / 1) have the same shape; the mean is over all pairs.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in shape")
    # BCE-with-logits uses log-sum-exp, so large |logits| never hit log(0).
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def pairwise_matching_loss(scores_pos: Tensor, scores_neg: Tensor) -> Tensor:
    """Matching loss over positive-pair logits (P,) and negative-pair logits (Q,): mean over P + Q."""
    logits = torch.cat([scores_pos.reshape(-1), scores_neg.reshape(-1)])  # (P + Q,)
    labels = torch.cat([torch.ones_like(scores_pos.reshape(-1)), torch.zeros_like(scores_neg.reshape(-1))])
    return binary_matching_loss(logits, labels)


# How the pairwise loss picks its negatives (TrainConfig.pairwise_negatives).


def check_pairwise_options(negatives: str, num_negatives: int, batch_size: int | None = None) -> None:
    """ValueError unless ``negatives`` is a known choice and ``num_negatives`` an int in 1..batch_size - 1.

    ``batch_size`` is the contrastive (global) batch; None checks only ``num_negatives >= 1``.
    """
    if negatives not in PAIRWISE_NEGATIVES:
        raise ValueError(f"unknown pairwise_negatives {negatives!r}; choose from {list(PAIRWISE_NEGATIVES)}")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives must be an integer >= 1, got {num_negatives!r}")
    if batch_size is not None and num_negatives > batch_size - 1:
        raise ValueError(f"num_negatives must be in 1..{batch_size - 1} (fewer than the contrastive batch of "
                         f"{batch_size}: a pair's negatives are the other {batch_size - 1} items), got {num_negatives}")


def random_negatives(n: int, num_negatives: int, generator: torch.Generator | None = None) -> Tensor:
    """For each of ``n`` items i, ``num_negatives`` distinct indices j != i drawn uniformly from 0..n-1.

    Returns (n, num_negatives) int64 on the generator's device (the CPU for the default generator).
    The draw depends only on ``n``, ``num_negatives`` and the generator state (never on the data),
    and consumes ``num_negatives`` draws of n integers: ranks that hold the same generator state
    all draw the same global choice, and each takes its own rows. Pick t chooses the r-th of the
    ``n - 1 - t`` indices still free (r uniform), by stepping r over the taken ones in sorted order.
    """
    check_pairwise_options("random", num_negatives, n)
    device = generator.device if generator is not None else torch.device("cpu")
    taken = torch.arange(n, device=device).unsqueeze(1)  # (n, 1): the positive is never a negative
    for t in range(num_negatives):
        r = torch.randint(n - 1 - t, (n,), generator=generator, device=device)  # (n,) rank among the free
        for column in taken.sort(dim=1).values.unbind(1):  # ascending: r-th free index
            r = r + (r >= column).long()
        taken = torch.cat([taken, r.unsqueeze(1)], dim=1)  # (n, t + 2)
    return taken[:, 1:]  # (n, num_negatives)


def hard_negatives(similarity: Tensor, num_negatives: int, offset: int = 0) -> Tensor:
    """For each row i of a (B, N) similarity block, the ``num_negatives`` most similar columns j != offset + i.

    Row i's positive is column ``offset + i`` (rank r's rows of a global batch: offset r * B). Uses the
    values detached (mining picks pairs; it is not differentiated). Returns (B, num_negatives) int64,
    most similar first.
    """
    if similarity.ndim != 2 or not 0 <= offset <= similarity.shape[1] - similarity.shape[0]:
        raise ValueError(f"similarity must be a (B, N) block with its positives at columns offset..offset+B-1, "
                         f"got {tuple(similarity.shape)} with offset {offset}")
    b, n = similarity.shape
    check_pairwise_options("hard", num_negatives, n)
    rows = torch.arange(b, device=similarity.device)
    scores = similarity.detach().clone()  # (B, N)
    scores[rows, rows + offset] = float("-inf")  # the positive can never win
    return scores.topk(num_negatives, dim=1).indices  # (B, num_negatives)


def sample_negatives(
    similarity: Tensor,
    num_negatives: int,
    hard: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """For each row i of a (B, B) similarity matrix, pick ``num_negatives`` columns j != i.

    ``hard=False``: ``random_negatives`` (uniform without replacement, reproducible with a seeded
    ``generator``; the similarity values are not used). ``hard=True``: ``hard_negatives``, the
    highest-similarity wrong columns, most similar first. Returns (B, num_negatives) int64 on the
    similarity's device; never the positive ``i``.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be (B, B), got {tuple(similarity.shape)}")
    if hard:
        return hard_negatives(similarity, num_negatives)
    return random_negatives(similarity.shape[0], num_negatives, generator).to(similarity.device)


def pairwise_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    num_negatives: int = 1,
    negatives: str = "random",
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """Binary image-text matching (the ITM loss of ALBEF / BLIP, on dual-encoder scores), both directions.

    Every pair is scored ``logit_scale * cos + logit_bias``. Over a contrastive batch of N pairs the
    binary cross-entropy is averaged over N * (1 + 2K) pairs, K = ``num_negatives``:
    - the N matched pairs (image i, text i), label 1;
    - for each image i, K texts j != i, label 0;
    - for each text j, K images i != j, label 0 (chosen independently of the image side).
    ``negatives="random"``: uniform among the other N - 1 without replacement, drawn from
    ``generator`` (``random_negatives``: texts for the images first, then images for the texts).
    ``negatives="hard"``: the K most similar non-matching ones by the detached cosine similarity,
    as ALBEF / BLIP mine ITM negatives (``hard_negatives``); there the positive is excluded only by
    index, so a duplicate caption of an image's own can be its hard negative.

    With ``world_size > 1`` features are all-gathered with gradients (``gather_features``), so N is
    the global batch and negatives come from every rank. Rank r computes the loss of its own rows
    (its B positives, its B images' and its B texts' negatives) as the mean over those B * (1 + 2K)
    pairs; every rank has as many, so the mean over ranks, which DDP optimises, is the
    single-process loss on the global batch. Random negatives: every rank draws the global (N, K)
    choice from its ``generator`` and takes its rows, so ranks must hold the same generator state
    (seed it the same on every rank and call the loss the same number of times); the draw then
    equals the single-process draw exactly.
    """
    _check_features(image_features, text_features)
    b = image_features.shape[0]
    n = b * world_size  # the contrastive (global) batch
    check_pairwise_options(negatives, num_negatives, n)
    if world_size > 1 and negatives == "random" and generator is None:
        raise ValueError("random pairwise negatives under world_size > 1 need a generator with the same state "
                         "on every rank (the default generator's state is not shared)")
    all_image, all_text = gather_features(image_features, text_features, rank, world_size)  # (N, D) each
    offset = rank * b  # this rank's rows of the global batch
    if negatives == "hard":
        with torch.no_grad():
            neg_texts = hard_negatives(image_features @ all_text.T, num_negatives, offset)  # (B, K)
            neg_images = hard_negatives(text_features @ all_image.T, num_negatives, offset)  # (B, K)
    else:
        rows = slice(offset, offset + b)
        neg_texts = random_negatives(n, num_negatives, generator)[rows].to(image_features.device)  # (B, K)
        neg_images = random_negatives(n, num_negatives, generator)[rows].to(image_features.device)  # (B, K)
    pos = (image_features * text_features).sum(-1)  # (B,) cosines of the matched pairs
    image_text = torch.einsum("bd,bkd->bk", image_features, all_text[neg_texts])  # (B, K) image i, text j
    text_image = torch.einsum("bd,bkd->bk", text_features, all_image[neg_images])  # (B, K) text j, image i
    neg = torch.cat([image_text, text_image], dim=1)  # (B, 2K)
    return pairwise_matching_loss(logit_scale * pos + logit_bias, logit_scale * neg + logit_bias)


# ----------------------------------------------------------------------------- registry

# A plain dict literal: nothing registers itself at import time. The losses' signatures differ
# (siglip and pairwise also take ``logit_bias``), so call them with keyword arguments.
LOSSES: dict[str, Callable[..., Tensor]] = {
    "infonce": infonce_loss,
    "siglip": siglip_loss,
    "pairwise": pairwise_loss,
}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss function registered as ``name``; ValueError listing the choices otherwise."""
    return _choose(LOSSES, name, "loss")
