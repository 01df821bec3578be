"""GradCache against the reference it replaces: one forward + backward over the full batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.conftest import assert_close_to_scale, assert_same_grads, tiny_model_config
from vlpt.factory import create_model
from vlpt.losses import infonce_loss, siglip_loss
from vlpt.train.gradcache import gradcache_step, split_micro_batches

CORPUS = [f"a {size} {color} {shape}" for size in ("small", "large")
          for color in ("red", "green", "blue", "yellow") for shape in ("circle", "square", "star")]

LOSS_FNS = {
    "infonce": lambda img, txt, scale, bias: infonce_loss(img, txt, scale),
    "siglip": lambda img, txt, scale, bias: siglip_loss(img, txt, scale, bias),
}


def _batch(model: nn.Module, size: int, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 32, 32, 3), generator=g, dtype=torch.uint8)  # (B, H, W, 3)
    captions = [CORPUS[int(i)] for i in torch.randint(len(CORPUS), (size,), generator=g)]
    tokens = model.tokenize(captions)
    return {"images": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def _full_batch_step(model: nn.Module, batch: dict[str, Tensor], loss_fn) -> Tensor:
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    loss.backward()
    return loss.detach()


def _grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_gradcache_matches_full_batch(loss):
    config = tiny_model_config()
    if loss == "siglip":
        config.init_logit_bias = -10.0
    model = create_model(config, corpus=CORPUS, seed=0)
    # Eval mode: BatchNorm uses running statistics, so a micro-batch's features do not depend on
    # the other rows of its micro-batch (gradients still flow in eval mode).
    model.eval()
    batch = _batch(model, size=16)
    loss_fn = LOSS_FNS[loss]

    want_loss = _full_batch_step(model, batch, loss_fn)
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    got_loss = gradcache_step(model, batch, micro_batches=4, loss_fn=loss_fn)
    got = _grads(model)

    assert not got_loss.requires_grad
    assert_close_to_scale(got_loss, want_loss)
    assert all(g is not None for g in want.values())  # every parameter is really tested
    if loss == "siglip":
        assert want["logit_bias"].abs() > 0
    assert_same_grads(got, want, rel=1e-5)


class _DropoutToy(nn.Module):
    """A dual encoder with dropout in both towers, to test that GradCache replays the RNG."""

    def __init__(self, vocab: int = 100, dim: int = 16):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, dim), nn.Dropout(0.5))
        self.embed = nn.Embedding(vocab, dim)
        self.text_dropout = nn.Dropout(0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor | None]:
        image = self.image(images.float() / 255)  # (B, D)
        mask = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
        text = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)  # (B, D) mean over real tokens
        return {"image_features": F.normalize(image, dim=-1),
                "text_features": F.normalize(self.text_dropout(text), dim=-1),
                "logit_scale": self.logit_scale.exp(), "logit_bias": None}


def test_gradcache_replays_dropout_masks():
    torch.manual_seed(0)
    model = _DropoutToy().train()
    g = torch.Generator().manual_seed(1)
    batch = {"images": torch.randint(0, 256, (12, 8, 8, 3), generator=g, dtype=torch.uint8),
             "input_ids": torch.randint(0, 100, (12, 5), generator=g),
             "attention_mask": torch.ones(12, 5, dtype=torch.long)}
    loss_fn = LOSS_FNS["infonce"]

    # Reference: the same micro-batches forwarded in the same order (so the same dropout masks),
    # but kept in one graph and differentiated together.
    torch.manual_seed(123)
    outs = [model(m["images"], m["input_ids"], m["attention_mask"]) for m in split_micro_batches(batch, 3)]
    want_loss = loss_fn(torch.cat([o["image_features"] for o in outs]),
                        torch.cat([o["text_features"] for o in outs]), outs[-1]["logit_scale"], None)
    want_loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    got_loss = gradcache_step(model, batch, micro_batches=3, loss_fn=loss_fn)
    assert_close_to_scale(got_loss, want_loss.detach(), rel=1e-6)
    assert_same_grads(_grads(model), want, rel=1e-6)

    # The dropout really is active: another seed gives other gradients.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    gradcache_step(model, batch, micro_batches=3, loss_fn=loss_fn)
    assert not torch.allclose(model.embed.weight.grad, want["embed.weight"])


def test_uneven_split_and_bad_micro_batches():
    batch = {"images": torch.zeros(10, 8, 8, 3, dtype=torch.uint8),
             "input_ids": torch.zeros(10, 4, dtype=torch.long),
             "attention_mask": torch.ones(10, 4, dtype=torch.long)}
    parts = split_micro_batches(batch, 4)
    assert [p["images"].shape[0] for p in parts] == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="micro_batches"):
        split_micro_batches(batch, 11)
    with pytest.raises(KeyError, match="input_ids"):
        split_micro_batches({"images": batch["images"]}, 2)
