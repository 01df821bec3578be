"""Correctness of the speed-ups (issue 7): each fast path gives the plain path's outputs, gradients and
loss curve. Their speed is measured by bench/train_throughput.py, bench/cpu_memory.py and bench/inference.py,
never here."""

import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_close_to_scale, assert_same_grads, tiny_model_config, tiny_run_config
from vlpt.config import ImageTowerConfig, TextTowerConfig
from vlpt.models import dual_encoder
from vlpt.models.dual_encoder import DualEncoder
from vlpt.models.image_towers import ImageTower
from vlpt.models.text_towers import MIN_GROUP_ROWS, TextTower, length_groups
from vlpt.train.run import fit

TINY_VIT = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def assert_same_outputs_and_grads(module, fast, plain, rel=1e-5):
    """fast() and plain() return the same tensor, and the same parameter gradients for a random weighting,
    up to float rounding relative to each compared tensor's scale."""
    weights = None
    results = []
    for fn in (fast, plain):
        module.zero_grad(set_to_none=True)
        out = fn()
        if weights is None:
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (out_fast, g_fast), (out_plain, g_plain) = results
    assert_close_to_scale(out_fast, out_plain, rel)
    assert_same_grads(g_fast, g_plain, rel)


# ----------------------------------------------------------------------------- ViT: class token only

@pytest.mark.parametrize("extra", [{}, {"init_values": 0.1, "reg_tokens": 2, "qkv_bias": False}],
                         ids=["plain", "layerscale-registers-nobias"])
def test_vit_class_token_path_equals_the_full_forward(extra):
    torch.manual_seed(0)
    tower = ImageTower(ImageTowerConfig(name="vit_tiny_patch16_224", image_size=32, pool="timm",
                                        timm_kwargs={**TINY_VIT, **extra}))
    assert tower.class_token_only
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    tower.train()
    assert_same_outputs_and_grads(tower, lambda: tower.forward_pooled(images),
                                  lambda: tower.forward_features(images)[1])
    tower.eval()
    with torch.inference_mode():
        assert_close_to_scale(tower.forward_pooled(images), tower.forward_features(images)[1])


@pytest.mark.parametrize("name,pool", [("vit_tiny_patch16_224", "attn"), ("vit_tiny_patch16_224", "avg"),
                                       ("resnet-tiny", "timm"), ("resnet-tiny", "attn")])
def test_class_token_path_only_where_the_class_token_is_pooled(name, pool):
    kwargs = TINY_VIT if name.startswith("vit") else {}
    tower = ImageTower(ImageTowerConfig(name=name, image_size=32, pool=pool, timm_kwargs=kwargs)).eval()
    assert not tower.class_token_only
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert_close_to_scale(tower.forward_pooled(images), tower.forward_features(images)[1])


# ----------------------------------------------------------------------------- text: length groups

def test_length_groups_cover_every_row_once_at_its_groups_longest_length():
    rng = random.Random(0)
    for n in (64, 128, 256):
        lengths = [min(rng.randint(5, 14) + (rng.random() < 0.1) * rng.randint(5, 15), 32) for _ in range(n)]
        groups = length_groups(lengths)
        assert groups is not None
        rows = sorted(r for g, _ in groups for r in g)
        assert rows == list(range(n))
        for g, length in groups:
            assert len(g) >= MIN_GROUP_ROWS and length == max(lengths[r] for r in g)
        assert sum(len(g) * length for g, length in groups) < n * max(lengths)
    assert length_groups([7] * 64) is None  # nothing to save
    assert length_groups([5] * 63 + [6]) is None  # too little to save for a second call


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_text_tower_length_groups_equal_the_padded_batch(pool):
    torch.manual_seed(0)
    tower = TextTower(TextTowerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                      vocab_size=100, context_length=32, pool=pool)).train()
    g = torch.Generator().manual_seed(1)
    lengths = torch.cat([torch.randint(3, 12, (56,), generator=g), torch.randint(20, 33, (8,), generator=g)])
    lengths = lengths[torch.randperm(64, generator=g)]
    width = int(lengths.max())
    mask = (torch.arange(width)[None] < lengths[:, None]).long()  # (64, L)
    ids = torch.randint(5, 100, (64, width), generator=g) * mask
    assert length_groups(lengths.tolist()) is not None  # the grouped path really runs
    for chunk_tokens in (0, 40):  # 40: every length group also runs in forwards of about 40 tokens
        assert_same_outputs_and_grads(tower, lambda: tower.forward_pooled(ids, mask, chunk_tokens),
                                      lambda: tower.forward_features(ids, mask)[1])


def test_left_padded_batches_take_the_plain_path():
    tower = TextTower(TextTowerConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                      vocab_size=100, context_length=32)).eval()
    lengths = torch.tensor([4] * 40 + [30] * 24)
    mask = (torch.arange(30)[None] >= 30 - lengths[:, None]).long()  # padding on the left
    ids = torch.randint(5, 100, (64, 30)) * mask
    assert_close_to_scale(tower.forward_pooled(ids, mask), tower.forward_features(ids, mask)[1])


# ----------------------------------------------------------------------------- training: same loss curve

def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


VIT_RUN = {"model.image.name": "vit_tiny_patch16_224", "model.image.pool": "timm",
           "model.image.timm_kwargs": json.dumps(TINY_VIT), "train.checkpoint_every": 0}


def plain_paths(monkeypatch):
    monkeypatch.setattr(ImageTower, "forward_pooled", lambda self, images: self.forward_features(images)[1])
    monkeypatch.setattr(TextTower, "forward_pooled",
                        lambda self, ids, mask, chunk_tokens=0: self.forward_features(ids, mask)[1])
    monkeypatch.setattr(dual_encoder, "CPU_ENCODE_CHUNK", 0)  # models built now encode in one forward
    monkeypatch.setattr(dual_encoder, "CPU_ENCODE_TEXT_TOKENS", 0)


def test_fast_paths_train_the_same_loss_curve(tmp_path, monkeypatch):
    from vlpt.models import text_towers

    grouped = []

    def spy(lengths, *args, **kwargs):
        groups = length_groups(lengths, *args, **kwargs)
        grouped.append(groups is not None)
        return groups

    config = tiny_run_config(steps=4, **VIT_RUN, **{"train.batch_size": 64})
    with monkeypatch.context() as m:
        m.setattr(text_towers, "length_groups", spy)
        fit(config, tmp_path / "fast")
    assert any(grouped)  # the length-grouped text path really ran
    with monkeypatch.context() as m:
        plain_paths(m)
        fit(config, tmp_path / "plain")
    fast, plain = losses(tmp_path / "fast"), losses(tmp_path / "plain")
    assert len(fast) == 4
    assert fast == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_fused_adamw_matches_the_per_tensor_loop():
    torch.manual_seed(0)
    params = [torch.randn(7, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    fused = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, fused=True)
    loop = torch.optim.AdamW(copies, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, foreach=False)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) for p in params]
        for group, opt in ((params, fused), (copies, loop)):
            for p, grad in zip(group, grads):
                p.grad = grad.clone()
            opt.step()
    for p, q in zip(params, copies):
        assert_close_to_scale(p, q)


# ----------------------------------------------------------------------------- train.compile

class BrokenCompile:
    """Stands in for a compiled model whose compilation fails at the first call."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        raise RuntimeError("inductor: no C++ compiler (simulated)")


def test_compile_failure_falls_back_to_eager_with_the_same_losses(tmp_path, monkeypatch, caplog):
    config = tiny_run_config(steps=3, **{"train.checkpoint_every": 0})
    fit(config, tmp_path / "eager")
    monkeypatch.setattr(torch, "compile", BrokenCompile)
    compiled = tiny_run_config(steps=3, **{"train.checkpoint_every": 0, "train.compile": True})
    with caplog.at_level("WARNING"):
        fit(compiled, tmp_path / "fallback")
    assert "torch.compile failed" in caplog.text
    assert losses(tmp_path / "fallback") == losses(tmp_path / "eager")


# A fresh process per setting: glibc's malloc settings last for the life of a process.
KEEP_MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
import torch
from tests.conftest import tiny_run_config
from vlpt.train.run import fit

run_dir, keep = Path(sys.argv[1]), sys.argv[2]
fit(tiny_run_config(steps=3, **{"train.checkpoint_every": 0, "train.keep_cpu_memory": keep}), run_dir)


def block():  # 64 MB, over glibc's 32 MB mmap ceiling: allocated, written and freed, as activations are
    torch.empty(16 * 2**20).fill_(1.0)


for _ in range(3):  # the heap settles around the block within two or three rounds
    block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    block()
print(json.dumps({"faults_per_block": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_cpu_memory tunes glibc's malloc")
def test_cpu_training_keeps_freed_memory_without_changing_the_losses(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "VLPT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(root)}
    faults = {}
    for keep in ("false", "true"):
        done = subprocess.run([sys.executable, "-c", KEEP_MEMORY_PROBE, str(tmp_path / keep), keep], cwd=root,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        faults[keep] = json.loads(done.stdout.strip().splitlines()[-1])["faults_per_block"]
    # C library defaults: each 64 MB block is a fresh mapping whose 16,384 pages fault in on first touch;
    # after a Trainer on the CPU, the block reuses the freed pages
    assert faults["false"] > 1000
    assert faults["true"] < faults["false"] / 20
    assert losses(tmp_path / "true") == losses(tmp_path / "false")
    assert len(losses(tmp_path / "true")) == 3


@pytest.mark.slow
def test_compiled_training_follows_the_eager_loss_curve(tmp_path):
    config = tiny_run_config(steps=3, **VIT_RUN)
    fit(config, tmp_path / "eager")
    fit(tiny_run_config(steps=3, **VIT_RUN, **{"train.compile": True}), tmp_path / "compiled")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- chunked CPU encoding

@pytest.mark.parametrize("image", ["resnet-tiny", "vit"])
def test_chunked_encode_image_equals_one_forward(image):
    config = tiny_model_config()
    if image == "vit":
        config.image.name, config.image.pool, config.image.timm_kwargs = "vit_tiny_patch16_224", "timm", TINY_VIT
    torch.manual_seed(0)
    model = DualEncoder(config).eval()
    images = torch.randint(0, 256, (11, 32, 32, 3), dtype=torch.uint8)
    model.encode_chunk_size = 4  # 11 images: chunks of 4, 4 and 3
    assert_same_outputs_and_grads(model, lambda: model.encode_image(images), lambda: unchunked(model, images))
    with torch.inference_mode():
        assert_close_to_scale(model.encode_image(images), unchunked(model, images))
    # In train mode a ResNet's BatchNorm needs the whole batch: no chunks (the same output as chunk size 0).
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), unchunked(model, images), atol=0, rtol=0)


def test_chunked_encode_text_equals_one_forward():
    torch.manual_seed(0)
    model = DualEncoder(tiny_model_config(vocab_size=100)).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 17, (40,), generator=g)
    mask = (torch.arange(16)[None] < lengths[:, None]).long()  # (40, 16), right-padded
    tokens = {"input_ids": torch.randint(5, 100, (40, 16), generator=g) * mask, "attention_mask": mask}
    model.encode_chunk_tokens = 20  # a 16-token group runs one row per forward, a 4-token group 5
    with torch.inference_mode():
        chunked = model.encode_text(tokens)
        model.encode_chunk_tokens = 0
        assert_close_to_scale(chunked, model.encode_text(tokens))


def unchunked(model, images):
    size, model.encode_chunk_size = model.encode_chunk_size, 0
    try:
        return model.encode_image(images)
    finally:
        model.encode_chunk_size = size


# ----------------------------------------------------------------------------- batch norms folded for inference

@pytest.mark.parametrize("image", ["resnet-tiny", "resnetd-tiny", "vit"])
def test_folded_batch_norms_give_the_same_embeddings(image):
    """What `vlpt index` and `vlpt serve` run (inference_ready): every eval-mode batch norm folded into the
    convolution before it. The image embeddings stay the same (exact algebra, float64), and the caller's model
    keeps its norms (folding works on a copy); a ViT has none to fold and is not copied."""
    from vlpt.models.image_towers import fold_batch_norms
    from vlpt.serve.index import inference_ready

    config = tiny_model_config()
    if image == "vit":
        config.image.name, config.image.pool, config.image.timm_kwargs = "vit_tiny_patch16_224", "timm", TINY_VIT
    elif image == "resnetd-tiny":
        config.image.name = image
    torch.manual_seed(0)
    model = DualEncoder(config).double().eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:  # statistics and scales far from the identity, as after training
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.2, 3)
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
    images = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model.encode_image(images)
        ready = inference_ready(model)
        assert_close_to_scale(ready.encode_image(images), expected, rel=1e-12)
    left = [m for m in ready.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if image == "vit":
        assert not norms and ready is model
    else:
        assert len(norms) > 5 and not left and ready is not model
        assert len([m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]) == len(norms)
        model.train()  # in train mode nothing is folded: batch statistics are still to be learned
        assert fold_batch_norms(model.image_tower.backbone) == 0
