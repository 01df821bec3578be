"""Inference throughput, vlpt vs Hugging Face ``CLIPModel`` vs OpenCLIP, side by side in one run.

images/s of ``encode_image`` and texts/s of ``encode_text`` at batch 256 under ``torch.inference_mode``,
all three models randomly initialised with the same shape as bench/train_throughput.py (ViT 64 px,
patch 8, width 256, 4 layers, 4 heads, class-token pooling; text width 256, 4 layers, 4 heads, MLP 1024;
embedding 256; features L2-normalised by each library's own call or, for Hugging Face, right after it):

- vlpt: ``DualEncoder.encode_image`` / ``encode_text`` (from-scratch BERT text tower, mean pooling).
- Hugging Face: ``CLIPModel(CLIPConfig(...))`` with ``attn_implementation="sdpa"`` and ``hidden_act="gelu"``
  (the exact GELU the other two use), ``get_image_features`` / ``get_text_features``.
- OpenCLIP: ``open_clip.CLIP(embed_dim, CLIPVisionCfg, CLIPTextCfg)``, ``encode_image`` / ``encode_text``.

Data: the same random normalised float images (B, 3, 64, 64) for all three. Text: real shapes-world
captions, tokenised outside the timed region, each library as its users run it: Hugging Face with the
CLIP BPE vocabulary (OpenCLIP's bundled copy: the same vocabulary as ``CLIPTokenizer``, which would need a
download) padded to the longest caption in the batch, as ``CLIPProcessor(text=..., padding=True)`` does;
OpenCLIP with its tokenizer, which always pads to the 77-token context; vlpt with its WordPiece tokenizer,
which pads to the longest caption (and the text tower then groups captions by length). A fixed-shape
text setting (context 32, full-length random tokens for all) is reported too, where length handling
cannot help. Runs alternate between the libraries; each figure is the median over repeats.

    .venv/bin/python bench/inference.py [--threads 2] [--repeats 10] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import flop_counter, write_results
from peak import measure_peak_gflops
from train_throughput import (
    EMBED,
    HEADS,
    IMAGE_SIZE,
    LAYERS,
    PATCH,
    TEXT_HEADS,
    TEXT_LAYERS,
    TEXT_MLP,
    TEXT_WIDTH,
    WIDTH,
    build_openclip,
    build_vlpt,
    fixed_tokens,
    random_images,
    shapes_captions,
)

log = logging.getLogger("inference")
LIBRARIES = ("vlpt", "hf", "openclip")


def build_hf(vocab_size: int, context_length: int, seed: int = 0):
    """Hugging Face ``CLIPModel``, random init, the same shape, SDPA attention."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=TEXT_MLP,
                         num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS,
                         max_position_embeddings=context_length, hidden_act="gelu"),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="gelu"),
        projection_dim=EMBED)
    config._attn_implementation = "sdpa"
    model = CLIPModel(config).eval()
    assert model.config._attn_implementation == "sdpa"
    return model


def hf_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """OpenCLIP-tokenised (B, 77) CLIP BPE ids -> what CLIPProcessor(padding=True) returns: padded to the
    longest caption in the batch, with an attention mask."""
    mask = (ids != 0).long()
    length = int(mask.sum(1).max())
    return {"input_ids": ids[:, :length], "attention_mask": mask[:, :length]}


def encoders(models: dict) -> dict[str, tuple[Callable, Callable]]:
    """Per library: (encode_image(images), encode_text(tokens)), returning normalised features."""
    vlpt, hf, oc = models["vlpt"], models["hf"], models["openclip"]
    return {
        "vlpt": (lambda x: vlpt.encode_image(x), lambda t: vlpt.encode_text(t)),
        "hf": (lambda x: F.normalize(hf.get_image_features(pixel_values=x).pooler_output, dim=-1),
               lambda t: F.normalize(hf.get_text_features(**t).pooler_output, dim=-1)),
        "openclip": (lambda x: oc.encode_image(x, normalize=True), lambda t: oc.encode_text(t, normalize=True)),
    }


def time_alternating(calls: dict[str, Callable[[int], None]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each library, calls alternating (A, B, C, C, B, A, ...)."""
    names = list(calls)
    for name in names:
        for i in range(warmup):
            calls[name](i)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            start = time.perf_counter()
            calls[name](r)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def flops_of(fn: Callable[[], object]) -> float:
    counter = flop_counter()
    with counter, torch.inference_mode():
        fn()
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--batch", type=int, default=256, help="images / texts per call (default 256)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per library (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per library first")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 repeats, 1 warm-up; figures mean nothing")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    batch = args.batch
    peak = measure_peak_gflops(args.threads, repeats=3 if args.quick else 20)
    captions = shapes_captions(400 if args.quick else 2000)
    import open_clip

    bpe_vocab = open_clip.SimpleTokenizer().vocab_size
    models = {"vlpt": build_vlpt("vit", 77, captions).eval(), "hf": build_hf(bpe_vocab, 77),
              "openclip": build_openclip("vit", 77, bpe_vocab).eval()}
    enc = encoders(models)
    figures: dict = {"peak_gflops_fp32": peak}

    # ---- images
    images = [random_images(batch, seed=10 + i) for i in range(3)]

    def image_call(name):
        def call(i):
            with torch.inference_mode():
                enc[name][0](images[i % len(images)])
        return call

    seconds = time_alternating({n: image_call(n) for n in LIBRARIES}, args.repeats, args.warmup)
    ips = {n: batch / s for n, s in seconds.items()}
    for n in LIBRARIES:
        figures[f"{n}_images_per_s"] = ips[n]
        figures[f"{n}_gflop_per_image_encode"] = flops_of(lambda n=n: enc[n][0](images[0])) / batch / 1e9
    figures["encode_image_ratio_vs_hf"] = ips["vlpt"] / ips["hf"]
    figures["encode_image_ratio_vs_openclip"] = ips["vlpt"] / ips["openclip"]
    figures["mfu_encode_image"] = figures["vlpt_gflop_per_image_encode"] * ips["vlpt"] / peak

    # ---- captions, each library tokenised as its users run it
    g = torch.Generator().manual_seed(11)
    text_batches = []
    for _ in range(max(3, args.repeats)):
        texts = [captions[i] for i in torch.randperm(len(captions), generator=g)[:batch]]
        oc_ids = open_clip.tokenize(texts, context_length=77)  # (B, 77)
        text_batches.append({"vlpt": models["vlpt"].tokenize(texts), "hf": hf_batch(oc_ids), "openclip": oc_ids})

    def text_call(name, batches):
        def call(i):
            with torch.inference_mode():
                enc[name][1](batches[i % len(batches)][name])
        return call

    seconds = time_alternating({n: text_call(n, text_batches) for n in LIBRARIES}, args.repeats, args.warmup)
    tps = {n: batch / s for n, s in seconds.items()}
    for n in LIBRARIES:
        figures[f"{n}_texts_per_s"] = tps[n]
    figures["encode_text_ratio_vs_hf"] = tps["vlpt"] / tps["hf"]
    figures["encode_text_ratio_vs_openclip"] = tps["vlpt"] / tps["openclip"]

    # ---- fixed shapes: context 32, full-length random tokens (no padding to save)
    vlpt_ids, oc_ids = fixed_tokens(batch, 32, models["vlpt"].tokenizer.vocab_size, seed=12)
    fixed = [{"vlpt": vlpt_ids, "hf": {"input_ids": oc_ids, "attention_mask": torch.ones_like(oc_ids)},
              "openclip": None}]
    seconds = time_alternating({n: text_call(n, fixed) for n in ("vlpt", "hf")}, args.repeats, args.warmup)
    figures["encode_text_ratio_vs_hf_fixed"] = seconds["hf"] / seconds["vlpt"]
    figures["vlpt_texts_per_s_fixed"] = batch / seconds["vlpt"]
    figures["hf_texts_per_s_fixed"] = batch / seconds["hf"]

    first = ["encode_image_ratio_vs_hf", "encode_image_ratio_vs_openclip", "encode_text_ratio_vs_hf",
             "encode_text_ratio_vs_openclip", "encode_text_ratio_vs_hf_fixed", "mfu_encode_image"]
    figures = {**{k: figures[k] for k in first}, **{k: v for k, v in figures.items() if k not in first}}
    first_batch = text_batches[0]
    config = {
        "batch": batch, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
        "statistic": "median seconds per call, calls alternating between libraries", "mode": "torch.inference_mode",
        "vit": f"{IMAGE_SIZE}px patch {PATCH} width {WIDTH} layers {LAYERS} heads {HEADS}, class-token pooling",
        "text": f"width {TEXT_WIDTH} layers {TEXT_LAYERS} heads {TEXT_HEADS} mlp {TEXT_MLP}, context 77",
        "hf": "CLIPModel(CLIPConfig(...)), random init, attn_implementation=sdpa, hidden_act=gelu",
        "images": "the same random normalised float (B, 3, 64, 64) for all three",
        "text_tokens": "shapes-world captions tokenised outside the timed region. HF: CLIP BPE ids padded to the "
                       "longest caption in the batch, as CLIPProcessor(padding=True) returns them (what its users "
                       "run); OpenCLIP: its tokenizer pads to 77 (its only mode); vlpt: WordPiece padded to the "
                       "longest caption, grouped by length inside the text tower",
        "text_fixed": "context 32, full-length random tokens for vlpt and HF (no padding anywhere)",
        "first_batch_lengths": {"vlpt": int(first_batch["vlpt"]["input_ids"].shape[1]),
                                "hf": int(first_batch["hf"]["input_ids"].shape[1]), "openclip": 77},
        "peak": "bench/peak.py measure_peak_gflops, same threads, same run",
        "flops": "common.flop_counter (FlopCounterMode + CPU flash attention) of one call; it does not see "
                 "inside OpenCLIP's fused nn.MultiheadAttention inference path (_native_multi_head_attention), "
                 "so OpenCLIP's count is low",
        "open_clip_torch": metadata.version("open_clip_torch"),
    }
    write_results("inference", figures, config)


if __name__ == "__main__":
    main()
