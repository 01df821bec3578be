"""A pre-trained dual encoder with fusion and a task head on top: classification, image-text matching
or visual question answering.

    images ─> image tower ─> tokens_I, e_I ─┐
                                            ├─> fusion (concat | sum | gated | cross) ─> head ─> logits
    text   ─> text tower  ─> tokens_T, e_T ─┘
    (classify reads e_I alone: image -> class)

Saved like every vlpt model: ``config.json`` (task, fusion, head, output names and the encoder's
config) + ``model.safetensors`` (encoder, fusion and head weights) + ``tokenizer/``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import FINETUNE_INPUTS, FINETUNE_TASKS, ModelConfig, from_dict, to_dict
from vlpt.data.pairs import token_rows
from vlpt.data.transforms import images_as_batch, tower_transform
from vlpt.models.dual_encoder import (
    CONFIG_NAME,
    DualEncoder,
    PooledCache,
    SavesPretrained,
    find_model_dir,
    load_weights,
    pixel_digests,
    read_model_config,
    read_tokenizer,
    token_keys,
    write_model_files,
)
from vlpt.models.fusion import FUSION_METHODS, FusionConfig, create_fusion
from vlpt.models.heads import ClassifierHead, MatchingHead, VQAHead
from vlpt.tokenization import Tokenizer

TASKS = FINETUNE_TASKS  # the names live in vlpt.config, which checks configs against them
INPUTS = FINETUNE_INPUTS
MODEL_TYPE = "vlpt-task"  # config.json's "model_type": tells a task model's folder from a dual encoder's


@dataclass
class TaskModelConfig:
    task: str = "classify"  # classify | match | vqa
    fusion: FusionConfig = field(default_factory=FusionConfig)  # unused by classify
    outputs: list[str] = field(default_factory=list)  # class names (classify) or answers (vqa); match: []
    head_hidden: int | None = None  # classify: MLP hidden width; None: linear
    freeze_towers: bool = False  # the encoder stays frozen (eval mode, no gradients)
    # Cross fusion: words whose tokens get a trainable embedding of the fusion's own (random start), added to the
    # text tower's tokens. A contrastively trained tower may blur words a task turns on ("A above B" and "B below A"
    # caption one scene, so "above" and "below" come out near-synonyms); frame words keep the tower's features only,
    # so unseen wording still reads as the tower reads it. Words the vocabulary spells in pieces are left out.
    word_codes: list[str] = field(default_factory=list)
    # Cross fusion with word codes: count the order-signed where around the first coded word (-1 before it, +1
    # after) instead of from the question's ends, so "is the A above the B?" keeps A's sign and B's whatever words
    # open the question; questions without a coded word keep the ends. False for models saved before it existed.
    order_around_codes: bool = False
    inputs: str = "both"  # both | question_only (every image replaced by a constant) | image_only (every text
    #                       replaced by a constant): the blind baselines that show what each input contributes
    encoder: ModelConfig = field(default_factory=ModelConfig)


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


class TaskModel(SavesPretrained, nn.Module):
    def __init__(self, config: TaskModelConfig, encoder: DualEncoder):
        super().__init__()
        check_task(config.task)
        if config.task != "classify" and config.fusion.method not in FUSION_METHODS:
            raise ValueError(f"unknown fusion method {config.fusion.method!r}; choose from {', '.join(FUSION_METHODS)}")
        if config.inputs not in INPUTS:
            raise ValueError(f"unknown inputs {config.inputs!r}; choose from {', '.join(INPUTS)}")
        if config.task == "classify" and config.inputs != "both":
            raise ValueError("a classify model reads only the image; inputs must be 'both'")
        if config.task != "match" and len(config.outputs) < 2:
            raise ValueError(f"the {config.task} head needs at least two output names, got {config.outputs}")
        self.config = config
        self.encoder = encoder
        config.encoder = encoder.config
        self.fusion = None
        if config.task == "classify":
            self.head = ClassifierHead(encoder.config.embed_dim, len(config.outputs), config.head_hidden)
        else:
            fusion = config.fusion
            fusion.dim = encoder.config.embed_dim
            fusion.image_token_dim = encoder.image_tower.width
            fusion.text_token_dim = encoder.text_tower.output_dim
            fusion.image_tokens = encoder.image_tower.num_tokens
            self.fusion = create_fusion(fusion)
            if config.task == "match":
                self.head = MatchingHead(self.fusion.out_dim)
            else:
                self.head = VQAHead(self.fusion.out_dim, len(config.outputs))
        self.register_buffer("code_index", None, persistent=False)  # (vocab,) token id -> row of word_code (0: none)
        if config.word_codes and config.fusion.method == "cross" and config.task != "classify":
            ids = encoder.tokenizer.single_token_ids(config.word_codes)
            index = torch.zeros(encoder.tokenizer.vocab_size, dtype=torch.long)
            index[ids] = torch.arange(1, len(ids) + 1)
            self.code_index = index  # rebuilt from the config on loading
            self.word_code = nn.Embedding(len(ids) + 1, self.fusion.token_dims[1], padding_idx=0)
            with torch.no_grad():  # at half the scale of the tower's (LayerNorm-ed) tokens
                self.word_code.weight.normal_(0, 0.5)[0].zero_()
        if config.freeze_towers:
            self.encoder.requires_grad_(False)
        self.image_cache: PooledCache | None = None  # see enable_image_cache
        self.text_cache: PooledCache | None = None  # see enable_text_cache
        self.train(self.training)

    def enable_image_cache(self, max_entries: int = 100_000) -> None:
        """Memoise frozen towers' image features (tokens and embedding) per image, by its uint8 pixels' digest:
        fine-tuning visits every image once per epoch, and a frozen tower gives the same features each time."""
        if not self.config.freeze_towers:
            raise ValueError("the image cache is only valid with frozen towers (freeze_towers)")
        self.image_cache = PooledCache(max_entries)

    def enable_text_cache(self, max_entries: int = 200_000) -> None:
        """Memoise frozen towers' text features (tokens and embedding) per text, by its token ids: VQA questions
        repeat across epochs, and a frozen (e.g. pretrained MiniLM) text tower costs most of a step otherwise."""
        if not self.config.freeze_towers:
            raise ValueError("the text cache is only valid with frozen towers (freeze_towers)")
        self.text_cache = PooledCache(max_entries)

    def prefill_text_cache(self, input_ids: torch.Tensor, lengths: torch.Tensor, rows_per_forward: int = 256
                           ) -> None:
        """Compute the text cache's entries for these texts (U, L) now, in forwards of ``rows_per_forward`` texts
        of similar length: a pretrained question tower runs near the CPU's peak on such batches (~530 questions/s
        for MiniLM on 2 cores, ~300/s on a training batch's 64 mixed lengths). At most the cache's limit."""
        if self.text_cache is None:
            raise ValueError("enable_text_cache first")
        order = torch.argsort(lengths, stable=True)[:self.text_cache.limit]
        device = self.encoder.logit_scale.device
        for start in range(0, len(order), rows_per_forward):
            tokens = token_rows(input_ids, lengths, order[start:start + rows_per_forward])
            self._cached_text_features(*self._tower_text(tokens["input_ids"].to(device),
                                                         tokens["attention_mask"].to(device)))

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.encoder.tokenizer

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        if self.config.freeze_towers:  # frozen towers keep BatchNorm statistics and dropout off
            self.encoder.eval()
        return self

    # ------------------------------------------------------------------ forward
    def encode(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Token-level and pooled (projected, L2-normalised) features of both towers."""
        out = self.encode_images(images)
        if input_ids is not None:
            out |= self.encode_texts(input_ids, attention_mask)
        return out

    def encode_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        enc = self.encoder
        if self.config.inputs == "question_only":  # blind baseline: every image is the same black square
            images = torch.zeros_like(images)
        if self.image_cache is not None and images.dtype == torch.uint8:
            flat = self.image_cache.pooled(pixel_digests(images), lambda rows: self._image_features(images[rows]),
                                           images.device)
            tokens, embed = flat[:, :-enc.config.embed_dim], flat[:, -enc.config.embed_dim:]
            return {"image_tokens": tokens.reshape(len(images), enc.image_tower.num_tokens, -1), "image_embed": embed}
        return self._image_features(images, flat=False)

    def _image_features(self, images: torch.Tensor, flat: bool = True):
        """The towers' image tokens and embedding: one (B, N * Ci + D) row per image when ``flat`` (the cache's)."""
        enc = self.encoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_towers):
            tokens, pooled = enc.image_tower.forward_features(images)  # (B, N, Ci), (B, C)
            embed = F.normalize(enc.image_proj(pooled), dim=-1)
        if flat:
            return torch.cat([tokens.flatten(1), embed], dim=1)
        return {"image_tokens": tokens, "image_embed": embed}

    def _tower_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the text tower is given of the texts: all of them, or for the image_only blind baseline each text's
        first token alone ([CLS])."""
        if self.config.inputs == "image_only":
            return input_ids[:, :1], attention_mask[:, :1]
        return input_ids, attention_mask

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self._tower_text(input_ids, attention_mask)
        if self.text_cache is None:
            tokens, embed = self._text_features(input_ids, attention_mask)
        else:
            tokens, embed = self._cached_text_features(input_ids, attention_mask)
        out = {"text_mask": attention_mask.bool(), "text_embed": embed}
        if self.code_index is not None:
            coded = self.code_index[input_ids]  # (B, L): row of word_code, 0 for uncoded tokens
            tokens = tokens + self.word_code(coded)  # (B, L, Ct)
            if self.config.order_around_codes:  # the first coded token's index, -1 where there is none
                is_coded = coded > 0
                first = is_coded.int().argmax(1)  # argmax gives the first of equal maxima
                out["text_pivot"] = torch.where(is_coded.any(1), first, -1)  # (B,)
        return {"text_tokens": tokens, **out}

    def _text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tower's tokens (B, L, Ct) and the projected, normalised embedding (B, D)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_towers):
            tokens, pooled = self.encoder.text_tower.forward_features(input_ids, attention_mask)  # (B, L, Ct), (B, C)
            return tokens, F.normalize(self.encoder.text_proj(pooled), dim=-1)

    def _cached_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_text_features`` through the cache: each text's entry is its unpadded tokens and its embedding in one
        flat row, kept in host memory (it may be filled before the model moves to its device); padding positions
        come back as zeros (the fusion masks them)."""
        dim, width = self.encoder.config.embed_dim, self.encoder.text_tower.output_dim

        def compute(rows: torch.Tensor) -> list[torch.Tensor]:
            tokens, embed = self._text_features(input_ids[rows], attention_mask[rows])
            lengths = attention_mask[rows].sum(1).tolist()
            return [torch.cat([t[:n].flatten(), e]).cpu() for t, e, n in zip(tokens, embed, lengths)]

        entries = self.text_cache.rows(token_keys(input_ids, attention_mask), compute, input_ids.device)
        tokens = entries[0].new_zeros(*input_ids.shape, width)  # (B, L, Ct)
        for row, entry in zip(tokens, entries):
            n = (len(entry) - dim) // width
            row[:n] = entry[:-dim].view(n, width)
        embed = torch.stack([entry[-dim:] for entry in entries])  # (B, D)
        return tokens.to(input_ids.device, non_blocking=True), embed.to(input_ids.device, non_blocking=True)

    def fuse(self, features: dict[str, torch.Tensor], image_index: torch.Tensor | None = None,
             text_index: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse image ``image_index[k]`` with text ``text_index[k]`` (default: row k with row k), so
        one pass of the towers serves many pairs (the matching task's negatives)."""
        def pick(key: str, index):
            return features[key] if index is None else features[key][index]
        pivot = {"text_pivot": pick("text_pivot", text_index)} if "text_pivot" in features else {}
        return self.fusion(pick("image_embed", image_index), pick("text_embed", text_index),
                           pick("image_tokens", image_index), pick("text_tokens", text_index),
                           pick("text_mask", text_index), **pivot)  # (P, out_dim)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits: (B, classes) for classify, (B,) for match, (B, answers) for vqa."""
        if self.config.task == "classify":
            return self.head(self.encode(images)["image_embed"])
        if input_ids is None:
            raise ValueError(f"the {self.config.task} task needs text (a caption or a question) with each image")
        return self.head(self.fuse(self.encode(images, input_ids, attention_mask)))

    # ------------------------------------------------------------------ use
    def _tokens(self, texts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        tokens = self.encoder.tokenize(list(texts))
        return {k: v.to(device) for k, v in tokens.items()}

    @torch.inference_mode()
    def predict(self, images, texts: Sequence[str] | None = None) -> torch.Tensor:
        """Probabilities: (B, classes) classify, (B,) match (caption describes image), (B, answers) vqa.
        ``images``: file paths, PIL images, or a uint8 / normalised float tensor batch."""
        self.eval()
        device = self.encoder.logit_scale.device
        image = self.encoder.config.image
        images = images_as_batch(images, transform=tower_transform(image)).to(device)
        if isinstance(texts, str):
            texts = [texts]
        if self.config.task == "classify":
            return self(images).softmax(-1)
        if texts is None or len(texts) != len(images):
            raise ValueError(f"give one text per image: {len(images)} images, {0 if texts is None else len(texts)} texts")
        tokens = self._tokens(texts, device)
        logits = self(images, tokens["input_ids"], tokens["attention_mask"])
        return logits.sigmoid() if self.config.task == "match" else logits.softmax(-1)

    def answer(self, images, questions: str | Sequence[str]) -> list[tuple[str, float]]:
        """(answer, probability) per image-question pair (vqa models)."""
        if self.config.task != "vqa":
            raise ValueError(f"this is a {self.config.task} model; `answer` needs one fine-tuned with task=vqa")
        probs = self.predict(images, questions)
        best = probs.max(-1)
        return [(self.config.outputs[int(i)], float(p)) for p, i in zip(best.values, best.indices)]

    def match(self, images, captions: str | Sequence[str]) -> list[float]:
        """Probability that each caption describes its image (match models)."""
        if self.config.task != "match":
            raise ValueError(f"this is a {self.config.task} model; `match` needs one fine-tuned with task=match")
        return self.predict(images, captions).tolist()

    # ------------------------------------------------------------------ save / load
    def write_files(self, directory: Path) -> None:
        config = copy.deepcopy(self.config)
        config.encoder = self.encoder.config_for_saving()
        write_model_files(directory, {"model_type": MODEL_TYPE, **to_dict(config)}, self, self.tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> TaskModel:
        directory = Path(directory)
        data = read_model_config(directory)
        if data.pop("model_type", None) != MODEL_TYPE:
            raise FileNotFoundError(f"{directory} holds no fine-tuned vlpt task model (see `vlpt finetune`)")
        config = from_dict(TaskModelConfig, data, where=str(directory / CONFIG_NAME))
        tokenizer = read_tokenizer(directory, config.encoder.text.context_length)
        encoder = DualEncoder(config.encoder, tokenizer, load_pretrained_weights=False)
        return load_weights(cls(config, encoder), directory, device)


def load_task_model(path: str | Path, device: str | torch.device = "cpu") -> TaskModel:
    """A fine-tuned task model (classify, match or vqa) from its folder or its run folder."""
    return TaskModel.from_pretrained(find_model_dir(path), device=device)
