"""Issue 20: the demo recipe's quality, measured honestly — 3 seeds, held-out wording and held-out combinations —
side by side with OpenCLIP trained on the same scenes and captions for the same wall-clock time.

Per seed (the data seed and the init seed both change):
- vlpt: `tiny-shapes` (the demo config) through the run lifecycle, evaluated by `vlpt.evaluate.suite`.
- OpenCLIP (`pip install -e .[bench]`): `open_clip.CLIP` with a small ModifiedResNet image tower and a 2-layer text
  transformer of vlpt's width, its own BPE tokenizer (`SimpleTokenizer`, 49,408 tokens), its standard recipe
  (InfoNCE `ClipLoss`, AdamW with OpenCLIP's parameter groups, warm-up + cosine), batches of the same size drawn
  from the same training scenes (one random caption per image), trained for exactly the seconds vlpt trained.
  It is evaluated by the same code (`evaluate_shapes`) with the same held-out prompts, through an adapter that
  gives it vlpt's `encode_image` / `encode_text`.

Writes bench/results/quality.json: for each metric `<metric>_mean`, `_std`, `_min`, `_max`, `<metric>_seeds`, and
the same with the prefix `openclip_`. One run of the current code; the JSON records the commit and machine.

    .venv/bin/python bench/quality.py [--seeds 0 1 2] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

from vlpt.config import RunConfig, load_config  # noqa: E402
from vlpt.data.pairs import epoch_batch, step_generator  # noqa: E402
from vlpt.data.shapes import default_cache_dir  # noqa: E402
from vlpt.data.splits import load_pairs  # noqa: E402
from vlpt.evaluate.suite import evaluate_shapes  # noqa: E402
from vlpt.train.run import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ("zeroshot_top1", "zeroshot_compositional_top1", "zeroshot_layout_top1", "retrieval_i2t_r5",
            "retrieval_t2i_r5")
METRICS = HEADLINE + ("zeroshot_shape_top1", "zeroshot_color_top1", "zeroshot_position_top1",
                      "zeroshot_layout_position_top1", "zeroshot_top1_seen_templates",
                      "zeroshot_compositional_top1_seen_templates", "zeroshot_layout_top1_seen_templates",
                      "retrieval_i2t_r1", "retrieval_t2i_r1", "linear_probe_top1", "train_seconds", "steps")


# ----------------------------------------------------------------------------- OpenCLIP, the peer

class OpenClipAdapter(nn.Module):
    """An OpenCLIP model behind vlpt's evaluation interface: uint8 images (B, H, W, 3) normalised as OpenCLIP
    normalises (its mean / std), strings tokenized by its own tokenizer; features L2-normalised."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        import open_clip

        self.model, self.tokenizer = model, tokenizer
        self.register_buffer("mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return (images.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std  # (B, 3, H, W)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(self.pixels(images)), dim=-1)

    def encode_text(self, texts) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(list(texts))), dim=-1)


def openclip_model(config: RunConfig, seed: int) -> nn.Module:
    """OpenCLIP's CLIP built from its own configs (no download): a small ModifiedResNet (attention pooling, like
    vlpt's tower) and a causal text transformer of vlpt's text width, depth and heads."""
    import open_clip

    torch.manual_seed(seed)
    text = config.model.text
    vision = open_clip.CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, head_width=32, image_size=config.data.image_size)
    text_cfg = open_clip.CLIPTextCfg(context_length=text.context_length, vocab_size=49408, width=text.hidden_size,
                                     heads=text.num_heads, layers=text.num_layers,
                                     mlp_ratio=text.intermediate_size / text.hidden_size)
    return open_clip.CLIP(embed_dim=config.model.embed_dim, vision_cfg=vision, text_cfg=text_cfg)


def openclip_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with open_clip_train's groups: gains, biases and the temperature without weight decay."""
    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def train_openclip(config: RunConfig, seed: int, seconds: float, lr: float = 1e-3, warmup: int = 50,
                   weight_decay: float = 0.1) -> tuple[OpenClipAdapter, dict]:
    """OpenCLIP's recipe on the run's training scenes for ``seconds`` of training (timed like vlpt's: steps only).
    The cosine schedule spans the steps the budget allows, estimated from the first 20 steps."""
    import open_clip

    data = load_pairs(config.data, default_cache_dir())
    images = torch.from_numpy(np.ascontiguousarray(data.images))  # (N, H, W, 3) uint8
    model = openclip_model(config, seed)
    tokenizer = open_clip.SimpleTokenizer(context_length=config.model.text.context_length)
    adapter = OpenClipAdapter(model, tokenizer)
    loss_fn = open_clip.ClipLoss()
    optimizer = openclip_optimizer(model, lr, weight_decay)
    batch = config.train.batch_size
    starts = np.cumsum([0] + [len(c) for c in data.captions[:-1]])
    flat = [c for caps in data.captions for c in caps]
    model.train()
    total_steps, step, spent = None, 0, 0.0
    while spent < seconds:
        tick = time.perf_counter()
        index = epoch_batch(len(images), batch, seed, step)
        g = step_generator(seed, step)
        pick = (torch.rand(len(index), generator=g) * torch.tensor([len(data.captions[i]) for i in index])).long()
        texts = [flat[starts[int(i)] + int(k)] for i, k in zip(index, pick)]
        planned = total_steps or 10**9
        factor = (step + 1) / warmup if step < warmup else \
            0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, planned - warmup))))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        image_features = model.encode_image(adapter.pixels(images[index]), normalize=True)
        text_features = model.encode_text(tokenizer(texts), normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        spent += time.perf_counter() - tick
        if step == 20:
            total_steps = int(seconds / (spent / step))
    model.eval()
    return adapter, {"steps": step, "train_seconds": spent, "planned_steps": total_steps or step}


# ----------------------------------------------------------------------------- the benchmark

def summary(name: str, values: list[float], prefix: str = "") -> dict:
    return {f"{prefix}{name}_mean": statistics.mean(values),
            f"{prefix}{name}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            f"{prefix}{name}_min": min(values), f"{prefix}{name}_max": max(values), f"{prefix}{name}_seeds": values}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "bench" / "runs" / "quality")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, printed, not written")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = ["train.steps=20", "data.train_size=512", "eval.zero_shot_size=96", "eval.compositional_size=48",
             "eval.layout_size=48", "eval.retrieval_size=64", "eval.probe_train_size=96"] if args.quick else []
    vlpt_runs, peer_runs = [], []
    for seed in args.seeds:
        config = load_config("tiny-shapes", [f"data.seed={seed}", f"train.seed={seed}",
                                             f"train.threads={args.threads}", *quick])
        metrics = run(config, args.runs_dir / f"seed{seed}", overwrite=True, cache_dir=default_cache_dir())
        vlpt_runs.append(metrics)
        adapter, trained = train_openclip(config, seed, metrics["train_seconds"])
        with torch.inference_mode():
            result = evaluate_shapes(adapter, config.data, config.eval, default_cache_dir())
        peer_runs.append({**result.metrics, **trained})
        print(f"seed {seed}: vlpt zero-shot {metrics['zeroshot_top1']:.4f} / compositional "
              f"{metrics['zeroshot_compositional_top1']:.4f}; OpenCLIP {result.metrics['zeroshot_top1']:.4f} / "
              f"{result.metrics['zeroshot_compositional_top1']:.4f} ({trained['steps']} steps)", flush=True)
    figures: dict = {}
    for metric in METRICS:
        figures |= summary(metric, [float(m[metric]) for m in vlpt_runs])
        figures |= summary(metric, [float(m[metric]) for m in peer_runs], prefix="openclip_")
    for metric in HEADLINE:
        figures[f"{metric}_vlpt_minus_openclip"] = figures[f"{metric}_mean"] - figures[f"openclip_{metric}_mean"]
    config = {"vlpt_config": "tiny-shapes", "seeds": args.seeds, "threads": args.threads,
              "openclip": "open_clip.CLIP: ModifiedResNet layers (1,1,1,1) width 16, text transformer of vlpt's shape, "
                          "SimpleTokenizer, ClipLoss, AdamW lr 1e-3 wd 0.1 (gains/biases/scale 0), warm-up 50 + "
                          "cosine over the budget, same batch size, same scenes, vlpt's train_seconds per seed"}
    if args.quick:
        from common import print_table
        print_table("quality (--quick smoke run, not written)", {k: v for k, v in figures.items()
                                                                 if not k.endswith("_seeds")})
        return
    write_results("quality", figures, config)


if __name__ == "__main__":
    main()
