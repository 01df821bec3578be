"""Training throughput, vlpt vs OpenCLIP, side by side in one run: images/s of a full training step.

A step is what each library's training loop does per batch: forward both towers, the InfoNCE loss
(vlpt: ``ContrastiveTask`` with ``vlpt.losses.infonce_loss``; OpenCLIP: ``open_clip.ClipLoss``),
backward, AdamW step (built as each library's trainer builds it: vlpt's ``Trainer`` uses fused AdamW,
OpenCLIP's ``main.py`` the default per-tensor loop) and zeroing the gradients. No gradient clipping on
either side (OpenCLIP's default). The same random normalised float images for both; text as stated per
setting.

Model shape (both libraries): ViT 64 px, patch 8, width 256, 4 layers, 4 heads, class-token pooling;
text transformer width 256, 4 layers, 4 heads, MLP 1024; embedding 256. The ResNet variant uses timm's
``resnet18`` (average pooling + linear projection) as the image tower in both libraries, through
``ImageTowerConfig(name="resnet18")`` in vlpt and ``CLIPVisionCfg(timm_model_name="resnet18")`` in OpenCLIP.

Settings (keys of bench/results/train_throughput.json):
- ``eager`` (fixed shapes): context 32 and full-length random tokens for both, the same vocabulary size
  (vlpt's WordPiece vocabulary trained on the shapes captions), eager PyTorch. ``train_ratio_vs_openclip_eager`` = vlpt images/s / OpenCLIP images/s.
- ``captions``: context 77 and real shapes-world captions. OpenCLIP as users run it: its own tokenizer
  (49,408-token BPE) pads every caption to 77. vlpt as users run it: its WordPiece vocabulary trained on
  the captions, each batch trimmed to its longest caption (as ``PairBatches`` does).
- ``best``: each library at its best setting among eager and ``torch.compile`` (fixed shapes), so a
  compile that does not pay, or fails, falls back to eager (the failure is recorded).

Runs alternate (vlpt, OpenCLIP, vlpt, OpenCLIP, ...) after warm-up steps, and each figure is the median
over repeats, so slow drift of the machine hits both libraries alike. FLOPs per image are counted with
``common.flop_counter`` (torch's ``FlopCounterMode`` plus the CPU flash-attention kernels it skips) on one
training step (forward + backward), and
``mfu_train`` = achieved model FLOP/s / measured fp32 matmul peak (``bench/peak.py``, same threads, sampled
before and between the timed rounds). The process first makes glibc keep freed memory, as vlpt's ``Trainer``
does on the CPU (``keep_freed_cpu_memory``); that holds for OpenCLIP's steps in the same process too.

    .venv/bin/python bench/train_throughput.py [--threads 2] [--repeats 10] [--quick] [--no-compile]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import flop_counter, write_results
from peak import InterleavedPeak

from vlpt.config import ImageTowerConfig, ModelConfig, TextTowerConfig, TrainConfig
from vlpt.train.trainer import keep_freed_cpu_memory

log = logging.getLogger("train_throughput")

IMAGE_SIZE, PATCH, WIDTH, LAYERS, HEADS = 64, 8, 256, 4, 4
TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS, TEXT_MLP = 256, 4, 4, 1024
EMBED = 256
VOCAB = 1000  # vlpt's WordPiece vocabulary size for the shapes captions (the fixed-shape setting uses it for both)
ARCHS = ("vit", "resnet")


# ----------------------------------------------------------------------------- models

def shapes_captions(n_scenes: int = 2000, seed: int = 0) -> list[str]:
    """Real shapes-world training captions (5 per scene, the demo's object-count odds); no pixels rendered."""
    from vlpt.data.shapes import sample_scene

    return [c for i in range(n_scenes)
            for c in sample_scene(seed, "train", i, num_captions=5, count_weights=(3, 1, 1)).captions]


def vlpt_model_config(arch: str, context_length: int) -> ModelConfig:
    if arch == "vit":
        image = ImageTowerConfig(name="vit_tiny_patch16_224", image_size=IMAGE_SIZE, pool="timm",
                                 timm_kwargs=dict(patch_size=PATCH, embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS))
    elif arch == "resnet":
        image = ImageTowerConfig(name="resnet18", image_size=IMAGE_SIZE, pool="avg")
    else:
        raise ValueError(arch)
    text = TextTowerConfig(hidden_size=TEXT_WIDTH, num_layers=TEXT_LAYERS, num_heads=TEXT_HEADS,
                           intermediate_size=TEXT_MLP, vocab_size=VOCAB, context_length=context_length, pool="mean")
    return ModelConfig(embed_dim=EMBED, image=image, text=text)


def build_vlpt(arch: str, context_length: int, captions: list[str], seed: int = 0):
    """A vlpt dual encoder as a user builds it: config -> ``create_model`` (WordPiece trained on the captions)."""
    from vlpt.factory import create_model

    return create_model(vlpt_model_config(arch, context_length), corpus=captions, seed=seed)


def build_openclip(arch: str, context_length: int, vocab_size: int, seed: int = 0):
    """OpenCLIP's ``CLIP`` from ``CLIPVisionCfg`` / ``CLIPTextCfg`` (no download), the same shape."""
    import open_clip

    torch.manual_seed(seed)
    if arch == "vit":
        vision = open_clip.CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH,
                                         image_size=IMAGE_SIZE)
    else:
        vision = open_clip.CLIPVisionCfg(timm_model_name="resnet18", timm_pool="avg", timm_proj="linear",
                                         image_size=IMAGE_SIZE)
    text = open_clip.CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=TEXT_WIDTH,
                                 heads=TEXT_HEADS, layers=TEXT_LAYERS, mlp_ratio=TEXT_MLP / TEXT_WIDTH)
    return open_clip.CLIP(embed_dim=EMBED, vision_cfg=vision, text_cfg=text, output_dict=True)


def openclip_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as OpenCLIP's ``open_clip_train/main.py`` builds it (gains and biases without weight decay)."""
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
                             lr=5e-4, betas=(0.9, 0.98), eps=1e-6)


def vlpt_optimizer(model: torch.nn.Module, keep_cpu_memory: bool = True) -> torch.optim.Optimizer:
    """The optimizer vlpt's ``Trainer`` builds for this model (its defaults, CPU)."""
    from vlpt.tasks.contrastive import ContrastiveTask
    from vlpt.train.trainer import Trainer

    config = TrainConfig(device="cpu", grad_clip=0.0, keep_cpu_memory=keep_cpu_memory)
    return Trainer(ContrastiveTask(model), batches=None, config=config, run_dir=os.devnull).optimizer


# ----------------------------------------------------------------------------- data

def random_images(batch: int, seed: int) -> torch.Tensor:
    """The same data for both libraries: random normalised float images (B, 3, H, W), as a data
    pipeline's transform hands them over (vlpt also takes uint8, normalised inside the model)."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=g)
    return (u8.float() / 255 - 0.5) / 0.25


def fixed_tokens(batch: int, context: int, vocab: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Full-length random tokens (no padding): vlpt's {input_ids, attention_mask} and OpenCLIP's ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, context), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids


def caption_batches(captions: list[str], vlpt_tokenizer, batch: int, count: int, seed: int
                    ) -> list[tuple[dict, torch.Tensor]]:
    """``count`` batches of real captions: vlpt tokens trimmed to the batch's longest caption (from a corpus
    padded once, exactly as ``PairBatches`` serves them) and OpenCLIP's tokenizer output, padded to 77."""
    import open_clip

    from vlpt.data.pairs import token_rows

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        rows = torch.randperm(len(captions), generator=g)[:batch]
        texts = [captions[i] for i in rows]
        tokens = vlpt_tokenizer(texts)
        vlpt_tokens = token_rows(tokens["input_ids"], tokens["attention_mask"].sum(1), torch.arange(batch))
        out.append((vlpt_tokens, open_clip.tokenize(texts, context_length=77)))
    return out


# ----------------------------------------------------------------------------- steps

class Runner:
    """One library's training step on a list of batches (cycled), with its optimizer."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_step: Callable[[torch.nn.Module, tuple], torch.Tensor], batches: list[tuple]):
        self.name, self.model, self.optimizer, self.loss_step, self.batches = name, model, optimizer, loss_step, batches
        self.calls = 0
        self.times: list[float] = []
        model.train()

    def step(self, timed: bool = True) -> float:
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        start = time.perf_counter()
        loss = self.loss_step(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        if timed:
            self.times.append(seconds)
        return seconds

    def images_per_s(self, batch: int) -> float:
        return batch / statistics.median(self.times)


def vlpt_loss_step():
    from vlpt.tasks.contrastive import ContrastiveTask

    tasks: dict[int, ContrastiveTask] = {}

    def run(model, batch):
        task = tasks.setdefault(id(model), ContrastiveTask(model, "infonce"))
        images, tokens = batch
        return task.training_step({"images": images, **tokens})["loss"]
    return run


def openclip_loss_step():
    import open_clip

    loss_fn = open_clip.ClipLoss()

    def run(model, batch):
        images, ids = batch
        out = model(images, ids)
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    return run


def alternate(runners: list[Runner], repeats: int, warmup: int, between: Callable[[], None] | None = None) -> None:
    """Warm every runner up, then time them in turn: A, B, (C, D,) A, B, ... ``repeats`` rounds, calling
    ``between`` (e.g. a peak sample) after each round."""
    for runner in runners:
        for _ in range(warmup):
            runner.step(timed=False)
    for r in range(repeats):
        for runner in (runners if r % 2 == 0 else runners[::-1]):  # alternate who goes first, too
            gc.collect()
            runner.step()
        if between is not None:
            between()


def count_step_flops(runner: Runner) -> float:
    """FLOPs of one training step (forward + backward; the optimizer does no matmuls) on its next batch."""
    counter = flop_counter()
    batch = runner.batches[runner.calls % len(runner.batches)]
    with counter:
        loss = runner.loss_step(runner.model, batch)
        loss.backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def try_compile(model: torch.nn.Module, runner_factory: Callable[[torch.nn.Module], Runner], warmup: int
                ) -> tuple[Runner | None, str | None]:
    """A runner over ``torch.compile(model)`` (what vlpt's ``train.compile`` and OpenCLIP's ``--torchcompile``
    do); (None, error) when compiling or the first steps fail."""
    try:
        runner = runner_factory(torch.compile(model))
        for _ in range(warmup):
            runner.step(timed=False)
        return runner, None
    except Exception as err:  # noqa: BLE001 - any compile failure means "eager is the best setting"
        torch._dynamo.reset()
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


# ----------------------------------------------------------------------------- settings

def bench_fixed(arch: str, args, captions: list[str], ceiling: InterleavedPeak, figures: dict, config: dict
                ) -> None:
    """Fixed shapes: context 32, full-length tokens, same vocabulary; eager, and (ViT) compiled for `best`."""
    suffix = "" if arch == "vit" else f"_{arch}"
    batch, context = args.batch, 32
    images = random_images(batch, seed=1)
    vlpt_model = build_vlpt(arch, context, captions)
    vocab = vlpt_model.tokenizer.vocab_size  # OpenCLIP gets the same vocabulary size here
    vlpt_tokens, oc_ids = fixed_tokens(batch, context, vocab, seed=2)

    def vlpt_runner(model):
        return Runner("vlpt", model, vlpt_optimizer(model), vlpt_loss_step(), [(images, vlpt_tokens)])

    def oc_runner(model):
        return Runner("openclip", model, openclip_optimizer(model), openclip_loss_step(), [(images, oc_ids)])

    runners = [vlpt_runner(vlpt_model), oc_runner(build_openclip(arch, context, vocab))]
    flops = {r.name: count_step_flops(r) for r in runners}
    compiled: dict[str, Runner] = {}
    if arch == "vit" and not args.no_compile:
        for name, build, factory in (("vlpt", lambda: build_vlpt(arch, context, captions), vlpt_runner),
                                     ("openclip", lambda: build_openclip(arch, context, vocab), oc_runner)):
            start = time.perf_counter()
            runner, error = try_compile(build(), factory, args.warmup + 1)
            config[f"{name}_compile_seconds"] = round(time.perf_counter() - start, 1)
            if runner is None:
                config[f"{name}_compile_error"] = error
                log.warning("%s: torch.compile failed, eager is its best setting: %s", name, error)
            else:
                runner.name = f"{name}_compiled"
                compiled[name] = runner
    alternate(runners + list(compiled.values()), args.repeats, args.warmup, between=ceiling.sample)
    peak = ceiling.gflops()
    ips = {r.name: r.images_per_s(batch) for r in runners}
    figures[f"peak_gflops_fp32_for_mfu{suffix}"] = peak
    figures[f"train_ratio_vs_openclip_eager{suffix}"] = ips["vlpt"] / ips["openclip"]
    for name in ("vlpt", "openclip"):
        figures[f"{name}_images_per_s_eager{suffix}"] = ips[name]
        figures[f"{name}_gflop_per_image{suffix}"] = flops[name] / batch / 1e9
        figures[f"{name}_mfu_train_eager{suffix}"] = flops[name] / batch * ips[name] / 1e9 / peak
    figures[f"mfu_train{suffix}"] = figures[f"vlpt_mfu_train_eager{suffix}"]
    # the same, counting the FLOPs of the full computation for this shape (OpenCLIP's count), not vlpt's
    # executed FLOPs, which skip the ViT's discarded last-layer tokens
    figures[f"vlpt_mfu_train_nominal_flops{suffix}"] = flops["openclip"] / batch * ips["vlpt"] / 1e9 / peak
    config[f"fixed_shapes_vocab{suffix}"] = vocab
    if arch == "vit" and not args.no_compile:
        best = {}
        for name in ("vlpt", "openclip"):
            options = {"eager": ips[name]}
            if name in compiled:
                options["compiled"] = compiled[name].images_per_s(batch)
                figures[f"{name}_images_per_s_compiled"] = options["compiled"]
            setting = max(options, key=options.get)
            best[name] = options[setting]
            figures[f"{name}_images_per_s_best"] = best[name]
            config[f"{name}_best_setting"] = setting
        figures["train_ratio_vs_openclip_best"] = best["vlpt"] / best["openclip"]
        figures["mfu_train_best"] = flops["vlpt"] / batch * best["vlpt"] / 1e9 / peak


def bench_captions(args, captions: list[str], figures: dict, config: dict) -> None:
    """Context 77, real captions: OpenCLIP pads to 77 with its tokenizer; vlpt trims to the longest."""
    import open_clip

    batch = args.batch
    images = random_images(batch, seed=3)
    vlpt_model = build_vlpt("vit", 77, captions)
    pairs = caption_batches(captions, vlpt_model.tokenizer, batch, count=max(4, args.repeats), seed=4)
    oc_model = build_openclip("vit", 77, open_clip.SimpleTokenizer().vocab_size)
    runners = [Runner("vlpt", vlpt_model, vlpt_optimizer(vlpt_model), vlpt_loss_step(),
                      [(images, v) for v, _ in pairs]),
               Runner("openclip", oc_model, openclip_optimizer(oc_model), openclip_loss_step(),
                      [(images, o) for _, o in pairs])]
    flops = {r.name: count_step_flops(r) for r in runners}
    alternate(runners, args.repeats, args.warmup)
    ips = {r.name: r.images_per_s(batch) for r in runners}
    figures["train_ratio_vs_openclip_captions"] = ips["vlpt"] / ips["openclip"]
    for name in ("vlpt", "openclip"):
        figures[f"{name}_images_per_s_captions"] = ips[name]
        figures[f"{name}_gflop_per_image_captions"] = flops[name] / batch / 1e9  # first batch
    lengths = [int(v["input_ids"].shape[1]) for v, _ in pairs]
    mean_tokens = [float(v["attention_mask"].sum(1).float().mean()) for v, _ in pairs]
    config["captions_vlpt_batch_lengths"] = lengths
    config["captions_mean_caption_tokens_vlpt"] = round(statistics.mean(mean_tokens), 2)
    config["captions_mean_caption_tokens_openclip"] = round(
        statistics.mean(float((o != 0).sum(1).float().mean()) for _, o in pairs), 2)
    config["captions_openclip_vocab"] = oc_model.vocab_size
    config["captions_vlpt_vocab"] = vlpt_model.tokenizer.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128; 32 with --quick)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per library and setting (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per library and setting first")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile (`best`) setting")
    parser.add_argument("--arch", choices=ARCHS, nargs="+", default=list(ARCHS), help="image towers to run")
    parser.add_argument("--skip-captions", action="store_true", help="skip the context-77 captions setting")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: batch 32, 2 repeats, 1 warm-up; the figures mean nothing")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), 1
        args.batch = args.batch or 32
    args.batch = args.batch or 128
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    # vlpt's Trainer does this on the CPU; process-wide, so OpenCLIP's steps below get it too
    keeps_memory = keep_freed_cpu_memory()
    ceiling = InterleavedPeak(args.threads, repeats=3 if args.quick else 20)
    captions = shapes_captions(400 if args.quick else 2000)
    figures: dict = {}
    config: dict = {"batch": args.batch, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                    "quick": args.quick, "statistic": "median step time, runs alternating between libraries",
                    "step": "forward + InfoNCE + backward + AdamW step + zero_grad; no grad clipping",
                    "vit": f"{IMAGE_SIZE}px patch {PATCH} width {WIDTH} layers {LAYERS} heads {HEADS}, class-token pool",
                    "resnet": "timm resnet18, avg pool + linear projection (both libraries)",
                    "text": f"width {TEXT_WIDTH} layers {TEXT_LAYERS} heads {TEXT_HEADS} mlp {TEXT_MLP}; "
                            "vlpt: from-scratch BERT (mean pool); OpenCLIP: its causal text transformer",
                    "fixed_shapes": "context 32, full-length random tokens, both at the vocabulary size of "
                                    "vlpt's WordPiece trained on the captions (fixed_shapes_vocab)",
                    "captions": "context 77, shapes-world captions; OpenCLIP tokenizer pads to 77 (49,408 vocab); "
                                "vlpt trims each batch to its longest caption (WordPiece vocab from the captions)",
                    "images": "the same random normalised float (B, 3, 64, 64) for both",
                    "peak": "bench/peak.py InterleavedPeak: median of 2048^3 fp32 matmuls, 20 before the first "
                            "setting and 3 after each timed round, same threads, same run (a fixed-shape "
                            "setting's mfu uses the samples up to its end)",
                    "cpu_memory": "glibc keeps freed memory (vlpt.train.trainer.keep_freed_cpu_memory, as vlpt's "
                                  "Trainer does on the CPU), for the whole process: OpenCLIP's steps too"
                                  if keeps_memory else "C library defaults (not glibc)",
                    "mfu": "mfu_train = vlpt's executed FLOPs per step (bench/common.py flop_counter: "
                           "FlopCounterMode + CPU flash attention, forward + backward) "
                           "x steps/s / peak; *_nominal_flops counts the full computation of the shape instead",
                    "open_clip_torch": metadata.version("open_clip_torch")}
    for arch in args.arch:
        log.info("fixed shapes: %s", arch)
        bench_fixed(arch, args, captions, ceiling, figures, config)
    if not args.skip_captions:
        log.info("captions (context 77)")
        bench_captions(args, captions, figures, config)
    figures["peak_gflops_fp32"] = ceiling.gflops()
    figures["peak_gflops_fp32_at_start"] = ceiling.gflops_at_start()
    figures["peak_matmuls_timed"] = len(ceiling.times)
    first = [k for k in ("train_ratio_vs_openclip_eager", "train_ratio_vs_openclip_captions",
                         "train_ratio_vs_openclip_best", "mfu_train") if k in figures]
    figures = {**{k: figures[k] for k in first}, **{k: v for k, v in figures.items() if k not in first}}
    write_results("train_throughput", figures, config)


if __name__ == "__main__":
    main()
