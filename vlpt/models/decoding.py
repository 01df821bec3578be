"""Autoregressive decoding for the caption decoder: greedy, beam search, and top-k / nucleus sampling.

Every strategy is batched and model-agnostic: it only calls ``logits_fn(ids, rows) -> (R, V)``, the
next-token logits for R partial sequences ``ids`` (R, t) whose images are ``rows`` (R,) of the batch.
Sequences start with ``bos``, stop at ``eos`` (kept in the output) and are padded with ``pad`` after
it. Outputs are (B, L) token ids without the leading ``bos``, L <= ``max_length``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

STRATEGIES = ("greedy", "beam", "sample")

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DecodingConfig:
    strategy: str = "greedy"  # greedy | beam | sample
    beam: int = 3  # beam width (beam only); beam 1 is greedy
    length_penalty: float = 1.0  # beam: rank by sum log p / length ** length_penalty (0: raw sum, favours short)
    temperature: float = 1.0  # sample: logits are divided by it
    top_k: int = 0  # sample: keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # sample: keep the smallest set of tokens whose probability reaches top_p (nucleus)
    max_length: int | None = None  # generated tokens, end-of-sequence included; None: the decoder's limit
    seed: int = 0  # sample: the random stream (same seed, same images, same batch_size -> same captions)
    batch_size: int = 64  # images decoded together

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown decoding strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if not isinstance(self.beam, int) or self.beam < 1:
            raise ValueError(f"beam width must be an integer >= 1, got {self.beam!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max_length must be an integer >= 1 (tokens to generate), got {self.max_length!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _next_logits(logits_fn: LogitsFn, ids: torch.Tensor, rows: torch.Tensor, bos: int, pad: int) -> torch.Tensor:
    """Next-token logits (R, V) with [CLS] and [PAD] ruled out: neither is ever a caption token."""
    logits = logits_fn(ids, rows).float()
    logits[:, [bos, pad]] = -math.inf
    return logits


@torch.no_grad()
def greedy_search(logits_fn: LogitsFn, batch_size: int, bos: int, eos: int, pad: int, max_length: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The most likely next token at every step. Returns (B, L) ids, ``pad`` after ``eos``."""
    return _decode(logits_fn, batch_size, bos, eos, pad, max_length, device,
                   pick=lambda logits: logits.argmax(-1))


@torch.no_grad()
def sample(logits_fn: LogitsFn, batch_size: int, bos: int, eos: int, pad: int, max_length: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Ancestral sampling from the temperature-scaled, top-k and nucleus (top-p) filtered distribution."""
    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = filter_logits(logits / temperature, top_k, top_p)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)  # (R,)
    return _decode(logits_fn, batch_size, bos, eos, pad, max_length, device, pick)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the nucleus of mass top_p (the most
    likely token always survives)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (R, V)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return logits


def _decode(logits_fn: LogitsFn, batch_size: int, bos: int, eos: int, pad: int, max_length: int,
            device: torch.device | str, pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One token per step for every unfinished sequence; finished ones are padded and not run."""
    ids = torch.full((batch_size, 1), bos, dtype=torch.long, device=device)  # (B, 1)
    rows = torch.arange(batch_size, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    for _ in range(max_length):
        live = (~done).nonzero().squeeze(1)  # (R,)
        token = torch.full((batch_size,), pad, dtype=torch.long, device=device)
        token[live] = pick(_next_logits(logits_fn, ids[live], rows[live], bos, pad))  # (R,)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)  # (B, t+1)
        done |= token == eos
        if done.all():
            break
    if not out:
        return torch.full((batch_size, 0), pad, dtype=torch.long, device=device)
    return torch.stack(out, dim=1)  # (B, L)


@torch.no_grad()
def beam_search(logits_fn: LogitsFn, batch_size: int, bos: int, eos: int, pad: int, max_length: int,
                beam: int = 3, length_penalty: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep the ``beam`` best partial captions per image; return the best finished one.

    Hypotheses are ranked by ``sum log p / length ** length_penalty`` (length counts generated
    tokens, end-of-sequence included). A hypothesis that has emitted ``eos`` stays in the beam with
    a fixed score and competes with the live ones until all ``beam`` are finished or ``max_length``
    is reached. With beam 1 every step compares extensions of one hypothesis of one length, so
    the result is exactly greedy search.
    """
    if beam < 1:
        raise ValueError(f"beam width must be >= 1, got {beam}")
    B, K = batch_size, beam
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,) image of every hypothesis
    ids = torch.full((B * K, 1), bos, dtype=torch.long, device=device)  # (B*K, 1)
    scores = torch.zeros(B, K, device=device)  # sum of log p
    scores[:, 1:] = -math.inf  # the K start hypotheses are identical: keep one, or the beam fills with copies
    lengths = torch.zeros(B, K, device=device)
    done = torch.zeros(B, K, dtype=torch.bool, device=device)
    for _ in range(max_length):
        live = (~done).flatten().nonzero().squeeze(1)  # (R,)
        logits = _next_logits(logits_fn, ids[live], rows[live], bos, pad)  # (R, V)
        V = logits.shape[-1]
        if K > V:
            raise ValueError(f"beam width {K} is larger than the vocabulary ({V} tokens)")
        logp = torch.full((B * K, V), -math.inf, device=device)
        logp[:, pad] = 0.0  # a finished hypothesis continues only with padding, at no cost
        logp[live] = logits.log_softmax(-1)
        total = scores[..., None] + logp.view(B, K, V)  # (B, K, V)
        new_lengths = lengths + (~done).float()  # (B, K)
        ranked = total / new_lengths.clamp(min=1)[..., None] ** length_penalty  # (B, K, V)
        best = ranked.view(B, K * V).topk(K, dim=-1).indices  # (B, K) into the K*V candidates
        parent, token = best // V, best % V  # (B, K) each
        scores = total.view(B, K * V).gather(1, best)
        lengths = new_lengths.gather(1, parent)
        done = done.gather(1, parent) | (token == eos)
        history = ids.view(B, K, -1).gather(1, parent[..., None].expand(-1, -1, ids.shape[1]))  # (B, K, t)
        ids = torch.cat([history, token[..., None]], dim=2).view(B * K, -1)  # (B*K, t+1)
        if done.all():
            break
    final = scores / lengths.clamp(min=1) ** length_penalty  # (B, K); unfinished ones at max_length count too
    choice = final.argmax(dim=1)  # (B,)
    best_ids = ids.view(B, K, -1)[torch.arange(B, device=device), choice, 1:]  # (B, t) without bos
    used = int((best_ids != pad).sum(1).max()) if best_ids.numel() else 0
    return best_ids[:, :used]  # (B, L): columns only other hypotheses needed are dropped
