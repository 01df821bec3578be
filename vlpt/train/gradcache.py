"""GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): a contrastive step over a batch too big for one forward with graph, in micro-batches,
with the gradient of the loss over the FULL batch.

Plain gradient accumulation is wrong for contrastive losses: each micro-batch would only see its
own negatives. GradCache instead
  (a) embeds every micro-batch without a graph (cheap in memory),
  (b) computes the loss over all the cached features at once and backpropagates it to the
      features only, giving d loss / d feature for every row,
  (c) re-embeds each micro-batch with a graph and backpropagates those cached feature gradients
      into the parameters (chain rule), so parameter gradients accumulate to exactly what one
      full-batch backward would give.
Peak activation memory is one micro-batch; the price is a second forward pass.

Exactness caveats:
- BatchNorm in train mode normalises with the statistics of each micro-batch, so features (and
  gradients) differ from a full-batch forward, and running statistics are updated twice (once per
  pass). Equivalence is exact for towers without BatchNorm, or with BN in eval mode (running
  statistics), or with a locked image tower (kept in eval mode by ``DualEncoder``).
- Dropout: the RNG state of each micro-batch's first forward is saved and replayed for its second
  forward, so both passes draw the same masks (CPU and the batch's CUDA devices). The masks still
  differ from those a single full-batch forward would draw, as with any change of batch split.
- Under DistributedDataParallel, every micro-batch but the last runs in ``no_sync()``, so gradients
  are all-reduced once; ``loss_fn`` may all-gather features over ranks (``vlpt.losses`` does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

# (image_features (B, D), text_features (B, D), logit_scale (), logit_bias () or None) -> loss ()
ContrastiveLossFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]

BATCH_KEYS = ("images", "input_ids", "attention_mask")


class _RngState:
    """The CPU and CUDA generator states at one point, to replay a forward's random draws."""

    def __init__(self, cuda_devices: Sequence[torch.device]):
        self.cuda_devices = list(cuda_devices)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        # fork_rng restores the current states afterwards, so replaying consumes no randomness.
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def split_micro_batches(batch: dict[str, Tensor], micro_batches: int,
                        required: Sequence[str] = BATCH_KEYS) -> list[dict[str, Tensor]]:
    """Split every tensor of the batch along dim 0 into ``micro_batches`` near-equal parts; the keys
    in ``required`` must be present (a contrastive batch by default)."""
    missing = [k for k in required if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {', '.join(missing)}; expected keys {', '.join(required)}")
    size = batch["images"].shape[0]
    if not 1 <= micro_batches <= size:
        raise ValueError(f"micro_batches must be in 1..{size} for a batch of {size}, got {micro_batches}")
    chunks = {k: torch.tensor_split(v, micro_batches) for k, v in batch.items()}
    return [{k: chunks[k][i] for k in batch} for i in range(micro_batches)]


def _forward(model: nn.Module, micro: dict[str, Tensor]) -> dict[str, Tensor]:
    return model(micro["images"], micro["input_ids"], micro["attention_mask"])


def gradcache_step(
    model: nn.Module,
    batch: dict[str, Tensor],
    micro_batches: int,
    loss_fn: ContrastiveLossFn,
) -> Tensor:
    """One GradCache forward + backward; accumulates into ``.grad`` and returns the loss (detached).

    ``model(images, input_ids, attention_mask)`` returns ``image_features``, ``text_features``,
    ``logit_scale`` and ``logit_bias`` (a ``DualEncoder``, possibly wrapped in DDP). ``loss_fn`` is
    called once, on the features of the whole batch: e.g.
    ``lambda i, t, s, b: infonce_loss(i, t, s, rank=rank, world_size=world_size)``.
    The optimizer step and ``zero_grad`` stay with the caller, as for ``loss.backward()``.
    """
    micros = split_micro_batches(batch, micro_batches)
    cuda_devices = sorted({t.device for t in batch.values() if t.is_cuda}, key=str)

    # (a) Features of every micro-batch, without a graph.
    rng_states: list[_RngState] = []
    image_parts: list[Tensor] = []
    text_parts: list[Tensor] = []
    with torch.no_grad():
        for micro in micros:
            rng_states.append(_RngState(cuda_devices))
            out = _forward(model, micro)
            image_parts.append(out["image_features"])  # (b_i, D)
            text_parts.append(out["text_features"])  # (b_i, D)
    sizes = [part.shape[0] for part in image_parts]

    # (b) The full-batch loss over leaf copies of the cached features and of the temperature
    # (and bias); backward stops at these leaves, giving d loss / d each of them.
    image_features = torch.cat(image_parts).requires_grad_()  # (B, D)
    text_features = torch.cat(text_parts).requires_grad_()  # (B, D)
    logit_scale = out["logit_scale"].detach().requires_grad_()  # ()
    logit_bias = out["logit_bias"]
    if logit_bias is not None:
        logit_bias = logit_bias.detach().requires_grad_()  # ()
    with torch.enable_grad():
        loss = loss_fn(image_features, text_features, logit_scale, logit_bias)
        loss.backward()
    image_grads = image_features.grad.split(sizes)  # [(b_i, D)]
    text_grads = text_features.grad.split(sizes)  # [(b_i, D)]

    # (c) Re-run each micro-batch with a graph and push the cached gradients into the parameters.
    no_sync = getattr(model, "no_sync", None)  # DDP: all-reduce once, on the last micro-batch
    for i, micro in enumerate(micros):
        last = i == len(micros) - 1
        sync = contextlib.nullcontext() if (last or no_sync is None) else no_sync()
        with sync, rng_states[i].replay():
            out = _forward(model, micro)
            outputs = [out["image_features"], out["text_features"]]
            grads = [image_grads[i], text_grads[i]]
            if last:
                # The temperature (and bias) is the same parameter in every forward: its gradient
                # goes in once, through the last (synchronised) forward.
                outputs.append(out["logit_scale"])
                grads.append(logit_scale.grad)
                if logit_bias is not None:
                    outputs.append(out["logit_bias"])
                    grads.append(logit_bias.grad)
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return loss.detach()
