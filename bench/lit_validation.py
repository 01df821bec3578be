"""Issue 21: how the lit-fashion recipe was chosen -- transfer to held-out classes, on validation images only.

Both towers of ``lit-fashion`` are locked, so a run is its two projections (and temperature) trained on fixed
features. This script computes the features once with vlpt's own towers (EfficientNet-Lite0 at 112 px on the
55,000 training and 5,000 validation photos, MiniLM on every prompt; cached under bench/runs/lit_validation),
then replays lit-fashion's training on them (the same data order rules, one random caption of four per image,
InfoNCE with a learned temperature, AdamW with weight decay on matrices, 50 warm-up steps and a cosine, clipping
at 1) for each candidate recipe, holding out each of the 15 pairs of the six classes that are in neither test
pair (sandal + bag, dress + ankle boot) in turn. Score: validation photos of the held-out pair, classified
between its two classes with the evaluation prompts (chance 50%). The test photos and the test pairs are
never used. Writes bench/results/lit_validation.json.

    .venv/bin/python bench/lit_validation.py [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

from vlpt.config import load_config  # noqa: E402
from vlpt.data import fashion  # noqa: E402
from vlpt.evaluate.zero_shot import build_prompt_classifier, format_prompt  # noqa: E402
from vlpt.factory import create_model  # noqa: E402
from vlpt.losses import infonce_loss  # noqa: E402
from vlpt.models.dual_encoder import place_anchors  # noqa: E402
from vlpt.train.anchors import classifier_anchors  # noqa: E402
from vlpt.train.trainer import warmup_cosine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "runs" / "lit_validation" / "features.pt"
TEST_PAIRS = (("sandal", "bag"), ("dress", "ankle boot"))
VALIDATION_CLASSES = [i for i, n in enumerate(fashion.CLASS_NAMES) if not any(n in p for p in TEST_PAIRS)]
# name -> (learning rate, anchor weight); lit-fashion before this change was "no anchors, lr 2e-3"
RECIPES = {"no anchors, lr 2e-3": (2e-3, 0.0), "no anchors, lr 5e-4": (5e-4, 0.0),
           "anchors 1, lr 2e-3": (2e-3, 1.0), "anchors 10, lr 2e-3": (2e-3, 10.0),
           "anchors 3, lr 5e-4": (5e-4, 3.0), "anchors 10, lr 5e-4": (5e-4, 10.0),
           "anchors 30, lr 5e-4": (5e-4, 30.0), "anchors 10, lr 2e-4": (2e-4, 10.0)}


def features(threads: int) -> dict:
    """Locked-tower features of every training and validation photo and every prompt (computed once)."""
    if CACHE.is_file():
        return torch.load(CACHE, weights_only=True)
    torch.set_num_threads(threads)
    model = create_model(load_config("lit-fashion").model, seed=0).eval()
    texts = [format_prompt(t, c) for t in (*fashion.TRAIN_TEMPLATES, *fashion.EVAL_TEMPLATES)
             for c in fashion.CLASS_NAMES]
    out: dict = {"texts": texts}
    with torch.no_grad():
        tokens = model.tokenize(texts)
        out["text_pooled"] = model.text_tower.forward_pooled(tokens["input_ids"], tokens["attention_mask"], 0)
        for split in ("val", "train"):
            data = fashion.FashionDataset(split, image_size=28, num_captions=1)
            images = torch.from_numpy(data.images)
            out[f"{split}_pooled"] = torch.cat([model.image_tower.forward_pooled(images[s:s + 512])
                                                for s in range(0, len(images), 512)])
            out[f"{split}_rows"], out[f"{split}_labels"] = torch.from_numpy(data.indices), torch.from_numpy(data.labels)
            print(f"{split}: {len(images)} photos", flush=True)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, CACHE)
    return out


class Replay:
    """lit-fashion's training on cached features; the data and anchor rules are vlpt's own."""

    def __init__(self, feats: dict):
        self.f = feats
        self.text_row = {t: i for i, t in enumerate(feats["texts"])}
        self.pooled_of = {int(r): k for k, r in enumerate(feats["train_rows"])}
        self.config = load_config("lit-fashion")
        self.model = create_model(self.config.model, seed=0)
        self.training_sets: dict[tuple[str, ...], fashion.FashionDataset] = {}

    def prompts(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self.text_row]
        if missing:  # anchor prompts: the locked MiniLM, once each
            with torch.no_grad():
                tokens = self.model.tokenize(missing)
                pooled = self.model.text_tower.forward_pooled(tokens["input_ids"], tokens["attention_mask"], 0)
            self.f["texts"] = self.f["texts"] + missing
            self.f["text_pooled"] = torch.cat([self.f["text_pooled"], pooled])
            self.text_row.update({t: len(self.text_row) + i for i, t in enumerate(missing)})
        return self.f["text_pooled"][[self.text_row[t] for t in texts]]

    def training_set(self, names: list[str]) -> fashion.FashionDataset:
        """lit-fashion's training split with ``names`` held out (its rows and captions; read once per pair)."""
        c = self.config.data
        if tuple(names) not in self.training_sets:
            self.training_sets[tuple(names)] = fashion.FashionDataset(
                "train", image_size=c.image_size, seed=c.seed, num_captions=c.num_captions, size=c.train_size,
                holdout_classes=names)
        return self.training_sets[tuple(names)]

    def run(self, held: list[int], lr: float, anchor_weight: float, seed: int = 0) -> float:
        c, t = self.config.data, self.config.train
        names = [fashion.CLASS_NAMES[h] for h in held]
        data = self.training_set(names)
        rows = data.indices
        pooled = self.f["train_pooled"][[self.pooled_of[int(r)] for r in rows]]
        caption_pooled = self.prompts([x for caps in data.captions for x in caps]).view(len(rows), c.num_captions, -1)
        anchors = classifier_anchors(self.model.config.image, self.model.tokenizer, t.anchor_template, names)
        anchor_text = self.prompts([format_prompt(t.anchor_template, n) for n in anchors.names])
        torch.manual_seed(seed)
        image_proj = nn.Linear(pooled.shape[1], self.config.model.embed_dim, bias=False)
        text_proj = nn.Linear(anchor_text.shape[1], self.config.model.embed_dim, bias=False)
        logit_scale = nn.Parameter(torch.tensor(self.config.model.init_logit_scale))
        matrices = [image_proj.weight, text_proj.weight]
        optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": t.weight_decay},
                                       {"params": [logit_scale], "weight_decay": 0.0}], lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup_steps, t.steps))
        g = torch.Generator().manual_seed(seed)
        order, position, n = torch.randperm(len(rows), generator=g), 0, t.batch_size
        for _ in range(t.steps):
            if position + n > len(rows):
                order, position = torch.randperm(len(rows), generator=g), 0
            batch = order[position:position + n]
            position += n
            pick = torch.randint(0, c.num_captions, (n,), generator=g)
            x = pooled[batch]
            scale = logit_scale.clamp(0, self.config.model.max_logit_scale).exp()
            loss = infonce_loss(F.normalize(image_proj(x), dim=-1),
                                F.normalize(text_proj(caption_pooled[batch, pick]), dim=-1), scale)
            if anchor_weight:
                a = torch.randperm(len(anchors), generator=g)[:n]
                placed = place_anchors(x, anchors.directions[a])
                loss = loss + anchor_weight * infonce_loss(F.normalize(image_proj(placed), dim=-1),
                                                           F.normalize(text_proj(anchor_text[a]), dim=-1), scale)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*matrices, logit_scale], t.grad_clip)
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            classes = build_prompt_classifier(lambda texts: text_proj(self.prompts(texts)), [
                [format_prompt(e, fashion.CLASS_NAMES[h]) for e in fashion.EVAL_TEMPLATES] for h in held])  # (D, 2)
            shown = torch.isin(self.f["val_labels"], torch.tensor(held))
            images = F.normalize(image_proj(self.f["val_pooled"][shown]), dim=-1)
            chosen = torch.tensor(held)[(images @ classes).argmax(1)]
            return float((chosen == self.f["val_labels"][shown]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    replay = Replay(features(args.threads))
    torch.set_num_threads(1)  # small matrices: one thread is fastest
    pairs = list(itertools.combinations(VALIDATION_CLASSES, 2))
    figures, table = {}, []
    for name, (lr, weight) in RECIPES.items():
        scores = [replay.run(list(p), lr, weight) for p in pairs]
        key = name.replace(", ", "_").replace(" ", "")
        figures[f"{key}_among_heldout_mean"] = statistics.mean(scores)
        figures[f"{key}_among_heldout_min"] = min(scores)
        table.append(f"{name:22s} mean {statistics.mean(scores):.3f} min {min(scores):.3f}  " + " ".join(
            f"{fashion.CLASS_NAMES[a][:5]}+{fashion.CLASS_NAMES[b][:5]} {s:.2f}" for (a, b), s in zip(pairs, scores)))
        print(table[-1], flush=True)
    write_results("lit_validation", figures, {
        "pairs": [[fashion.CLASS_NAMES[a], fashion.CLASS_NAMES[b]] for a, b in pairs], "images": "validation split",
        "recipes": {k: {"lr": lr, "anchor_weight": w} for k, (lr, w) in RECIPES.items()},
        "score": "held-out pair's validation photos classified between its two classes (chance 0.5)"})


if __name__ == "__main__":
    main()
