"""Fusion methods and task heads: shapes, gradients, formulas against direct computation, masking, and
a small synthetic task that only a model using both modalities can solve."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import assert_close_to_scale, tiny_model_config
from vlpt.models.dual_encoder import DualEncoder
from vlpt.models.fusion import FUSION_METHODS, FusionConfig, create_fusion
from vlpt.models.heads import ClassifierHead, MatchingHead, VQAHead

B, D, N, L, CI, CT = 5, 8, 6, 7, 12, 10


def _config(method: str, **kw) -> FusionConfig:
    return FusionConfig(method=method, dim=D, image_token_dim=CI, text_token_dim=CT, cross_width=16,
                        cross_layers=2, cross_heads=4, **kw)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 1, 5, 6])
    return {
        "image_embed": torch.randn(B, D, generator=g),
        "text_embed": torch.randn(B, D, generator=g),
        "image_tokens": torch.randn(B, N, CI, generator=g),
        "text_tokens": torch.randn(B, L, CT, generator=g),
        "text_mask": torch.arange(L)[None] < lengths[:, None],  # (B, L)
    }


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_shape_and_gradients(method):
    torch.manual_seed(0)
    fusion = create_fusion(_config(method))
    inputs = _inputs()
    for key in ("image_embed", "text_embed", "image_tokens", "text_tokens"):
        inputs[key].requires_grad_(True)
    out = fusion(**inputs)
    assert out.shape == (B, fusion.out_dim)
    assert fusion.out_dim == {"concat": 2 * D, "sum": D, "gated": D, "cross": 16}[method]
    (out * torch.randn_like(out)).sum().backward()  # random weights: no symmetry hides a zero gradient
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{method}: no gradient for {name}"
    needs = ["image_embed", "text_embed"] + (["image_tokens", "text_tokens"] if method == "cross" else [])
    for key in needs:
        assert inputs[key].grad is not None and inputs[key].grad.abs().sum() > 0, f"{method}: no gradient to {key}"
    if method == "cross":  # padded text tokens take no part at all
        pad = ~inputs["text_mask"]
        assert inputs["text_tokens"].grad[pad].abs().max() == 0
        assert inputs["text_tokens"].grad[~pad].abs().sum(-1).min() > 0


def test_concat_and_sum_exact():
    x = _inputs()
    i, t = x["image_embed"], x["text_embed"]
    assert torch.equal(create_fusion(_config("concat"))(i, t), torch.cat([i, t], dim=1))
    assert torch.equal(create_fusion(_config("sum"))(i, t), i + t)


def test_gated_formula():
    torch.manual_seed(0)
    fusion = create_fusion(_config("gated"))
    x = _inputs()
    i, t = x["image_embed"].double(), x["text_embed"].double()
    fusion.double()
    both = torch.cat([i, t], dim=1)
    w_a, b_a = fusion.gate_image.weight, fusion.gate_image.bias
    w_b, b_b = fusion.gate_text.weight, fusion.gate_text.bias
    expected = torch.sigmoid(both @ w_a.T + b_a) * i + torch.sigmoid(both @ w_b.T + b_b) * t
    torch.testing.assert_close(fusion(i, t), expected)


def test_cross_text_mask_masks():
    torch.manual_seed(0)
    fusion = create_fusion(_config("cross")).eval()
    x = _inputs()
    out = fusion(**x)
    pad = ~x["text_mask"]
    junk = dict(x, text_tokens=torch.where(pad[..., None], 100 * torch.randn_like(x["text_tokens"]),
                                           x["text_tokens"]))
    assert_close_to_scale(fusion(**junk), out)
    changed = dict(x, text_tokens=x["text_tokens"].clone())
    changed["text_tokens"][:, 0] += 1.0  # the first token is real in every row: the output must move
    assert (fusion(**changed) - out).abs().amax(dim=1).min() > 1e-4
    # No mask means every token counts, so the padding values matter again.
    no_mask = {k: v for k, v in x.items() if k != "text_mask"}
    assert not torch.allclose(fusion(**no_mask), fusion(**dict(junk, text_mask=None)))


def test_cross_without_tokens_is_a_clear_error():
    fusion = create_fusion(_config("cross"))
    x = _inputs()
    with pytest.raises(ValueError, match="image_tokens"):
        fusion(x["image_embed"], x["text_embed"])
    with pytest.raises(ValueError, match="token widths"):
        fusion(x["image_embed"], x["text_embed"], x["image_tokens"][..., :3], x["text_tokens"])


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError) as err:
        create_fusion(FusionConfig(method="bilinear"))
    for name in ("bilinear", "concat", "sum", "gated", "cross"):
        assert name in str(err.value)


def test_heads_shapes():
    x = torch.randn(B, 16)
    assert ClassifierHead(16, 48)(x).shape == (B, 48)
    mlp_head = ClassifierHead(16, 48, hidden=32)
    assert mlp_head(x).shape == (B, 48)
    assert any(isinstance(m, nn.GELU) for m in mlp_head.modules())
    assert not any(isinstance(m, nn.GELU) for m in ClassifierHead(16, 48).modules())
    assert MatchingHead(16)(x).shape == (B,)
    assert VQAHead(16, 30)(x).shape == (B, 30)
    assert VQAHead(16, 30, hidden=64)(x).shape == (B, 30)


def test_cross_fusion_on_dual_encoder_tokens():
    """The default path: towers' forward_features tokens and the projected embeddings fuse as-is."""
    torch.manual_seed(0)
    model = DualEncoder(tiny_model_config()).eval()
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    input_ids = torch.randint(5, 100, (2, 9))
    attention_mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    with torch.no_grad():
        image_tokens, image_pooled = model.image_tower.forward_features(images)
        text_tokens, text_pooled = model.text_tower.forward_features(input_ids, attention_mask)
        config = FusionConfig(method="cross", dim=model.config.embed_dim, image_token_dim=image_tokens.shape[-1],
                              text_token_dim=text_tokens.shape[-1], cross_width=32)
        out = create_fusion(config)(model.image_proj(image_pooled), model.text_proj(text_pooled),
                                    image_tokens, text_tokens, attention_mask)
    assert out.shape == (2, 32) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- a task that needs both inputs

def _synthetic_batch(n: int, g: torch.Generator, protos: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """Image class a and text class b in 0..3; label (a + b) mod 4, so either input alone is at chance (0.25).

    Embeddings carry a and b as prototypes plus noise. Tokens carry them too, at one random image token
    and one random real text token among noise tokens; padding is large junk. The cross model gets noise
    embeddings, so it must find the signal through attention.
    """
    a = torch.randint(0, 4, (n,), generator=g)
    b = torch.randint(0, 4, (n,), generator=g)
    image_embed = protos["image"][a] + 0.3 * torch.randn(n, D, generator=g)
    text_embed = protos["text"][b] + 0.3 * torch.randn(n, D, generator=g)
    image_tokens = 0.3 * torch.randn(n, N, CI, generator=g)
    image_tokens[torch.arange(n), torch.randint(0, N, (n,), generator=g)] += protos["image_token"][a]
    lengths = torch.randint(2, L + 1, (n,), generator=g)
    text_mask = torch.arange(L)[None] < lengths[:, None]  # (n, L)
    text_tokens = 0.3 * torch.randn(n, L, CT, generator=g)
    where = (torch.rand(n, generator=g) * lengths).long()  # a real (unpadded) position
    text_tokens[torch.arange(n), where] += protos["text_token"][b]
    text_tokens = torch.where(text_mask[..., None], text_tokens, 5 * torch.randn(n, L, CT, generator=g))
    inputs = {"image_embed": image_embed, "text_embed": text_embed, "image_tokens": image_tokens,
              "text_tokens": text_tokens, "text_mask": text_mask}
    return inputs, (a + b) % 4


@pytest.mark.parametrize("method", ["concat", "gated", "cross"])
def test_learns_task_needing_both_inputs(method):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    protos = {"image": torch.randn(4, D, generator=g), "text": torch.randn(4, D, generator=g),
              "image_token": torch.randn(4, CI, generator=g), "text_token": torch.randn(4, CT, generator=g)}
    fusion = create_fusion(_config(method))
    head = ClassifierHead(fusion.out_dim, 4, hidden=64)
    params = list(fusion.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3)

    def run(inputs: dict) -> torch.Tensor:
        if method == "cross":  # uninformative embeddings: the answer has to come from the tokens
            inputs = dict(inputs, image_embed=torch.randn_like(inputs["image_embed"]),
                          text_embed=torch.randn_like(inputs["text_embed"]))
        return head(fusion(**inputs))

    for _ in range(200):
        inputs, labels = _synthetic_batch(128, g, protos)
        loss = F.cross_entropy(run(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fusion.eval(), head.eval()
    with torch.no_grad():
        inputs, labels = _synthetic_batch(1000, torch.Generator().manual_seed(99), protos)
        accuracy = (run(inputs).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.9, f"{method}: held-out accuracy {accuracy:.3f} (chance 0.25)"


def test_cross_image_positions_tell_token_order_apart():
    """With position embeddings, the same image tokens in another order fuse to another vector (what
    relation questions need); the token count must match the one the fusion was built for."""
    torch.manual_seed(0)
    fusion = create_fusion(_config("cross", image_tokens=N)).eval()
    inputs = _inputs()
    flipped = dict(inputs, image_tokens=inputs["image_tokens"].flip(1))
    assert not torch.allclose(fusion(**inputs), fusion(**flipped), atol=1e-4)
    plain = create_fusion(_config("cross")).eval()  # without positions, attention is order-blind
    assert_close_to_scale(plain(**inputs), plain(**flipped))
    with pytest.raises(ValueError, match="image tokens"):
        fusion(**dict(inputs, image_tokens=inputs["image_tokens"][:, :3]))


def test_cross_where_readout_reports_where_attention_looked():
    """Each cross-attention head adds a projection of the attention-weighted (row, column) of the image tokens it
    looked at (and, after the first block, its offset from the previous look; pooled, the looks signed by word
    order): moving the one distinct image token moves the output; without the readouts (and without position
    embeddings) attention cannot tell the places apart."""
    torch.manual_seed(0)
    fusion = create_fusion(_config("cross", image_tokens=4)).eval()  # a 2 x 2 grid
    assert fusion.image_coords.tolist() == [[0, 0], [-1, -1], [-1, 1], [1, -1], [1, 1]]
    inputs = _inputs()
    tokens = torch.zeros(B, 4, CI)
    tokens[:, 0] = 3.0  # one object, top left ...
    moved = tokens.flip(1)  # ... or bottom right
    a = fusion(**dict(inputs, image_tokens=tokens))
    b = fusion(**dict(inputs, image_tokens=moved))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    with torch.no_grad():  # every path by which a place enters the output
        readouts = [fusion.signed_where] + [b.cross_attn.where for b in fusion.blocks] + \
            [b.cross_attn.where_relative for b in fusion.blocks if b.cross_attn.where_relative is not None]
        for readout in readouts:
            for p in readout.parameters():
                p.zero_()
        fusion.image_pos.zero_()
    assert_close_to_scale(fusion(**dict(inputs, image_tokens=tokens)), fusion(**dict(inputs, image_tokens=moved)))
