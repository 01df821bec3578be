"""The CLIP model: an image tower and a text tower projected into one space, with a learned temperature.

The model returns normalised features and the temperature; losses live in ``vlpt.losses``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vlpt.config import ModelConfig, from_dict, to_dict
from vlpt.io import ModelLoadError, atomic_directory
from vlpt.models.image_towers import ImageTower
from vlpt.models.text_towers import TextTower, in_row_chunks
from vlpt.tokenization import Tokenizer

CONFIG_NAME = "config.json"
# Images per forward, and tokens per text forward, when encoding large batches on the CPU: activations
# that size stay in the cores' caches (bench/inference.py: ~30% faster than one 256-row forward).
CPU_ENCODE_CHUNK = 32
CPU_ENCODE_TEXT_TOKENS = 2048  # as many tokens as 32 images of a 64 px, patch 8 ViT
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


class SavesPretrained:
    """``save_pretrained`` of every vlpt model: ``write_files`` into a temp folder renamed into place, so a
    crash never leaves half a model where a good one was."""

    def save_pretrained(self, directory: str | Path) -> Path:
        with atomic_directory(directory) as tmp:
            self.write_files(tmp)
        return Path(directory)


def projection(kind: str, width: int, embed_dim: int, tower: str) -> nn.Module:
    """A tower's pooled output (width) -> the shared embedding (embed_dim): ``kind`` linear (no bias, as CLIP),
    linear_bias (SigLIP's text head), none (SigLIP's image tower: the pooled output is the embedding)."""
    if kind == "none":
        if width != embed_dim:
            raise ValueError(f"{tower}_projection none needs embed_dim ({embed_dim}) equal to the {tower} tower's "
                             f"output width ({width})")
        return nn.Identity()
    if kind not in ("linear", "linear_bias"):
        raise ValueError(f"unknown {tower}_projection {kind!r}; choose from linear, linear_bias, none")
    return nn.Linear(width, embed_dim, bias=kind == "linear_bias")


def pixel_digests(images: torch.Tensor) -> list[bytes]:
    """A cache key per image: the digest of its pixels."""
    return [hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=16).digest() for row in images]


class PooledCache:
    """A locked tower's pooled outputs memoised by a key per input row (token ids, or an image's pixel digest):
    each distinct input goes through the tower once; at ``limit`` entries the cache starts over."""

    def __init__(self, limit: int):
        self.entries: dict[bytes, torch.Tensor] = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self.entries)

    @torch.no_grad()
    def pooled(self, keys: list[bytes], compute: Callable[[torch.Tensor], torch.Tensor], device: torch.device
               ) -> torch.Tensor:
        """(B, C) for the B keys; ``compute(rows)`` gives the pooled outputs of the inputs at ``rows`` (U, C)."""
        return torch.stack(self.rows(keys, compute, device))

    @torch.no_grad()
    def rows(self, keys: list[bytes], compute: Callable[[torch.Tensor], Sequence[torch.Tensor]],
             device: torch.device) -> list[torch.Tensor]:
        """The B keys' entries; ``compute(rows)`` gives one entry per input at ``rows`` (U of them; entries may
        differ in shape, e.g. a question's tokens)."""
        new = [k for k in dict.fromkeys(keys) if k not in self.entries]
        if new:
            first: dict[bytes, int] = {}
            for i, k in enumerate(keys):
                first.setdefault(k, i)
            entries = compute(torch.tensor([first[k] for k in new], device=device))  # U entries
            if len(self.entries) + len(new) > self.limit:
                self.entries.clear()
            self.entries.update(zip(new, entries))
        return [self.entries[k] for k in keys]


def token_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[bytes]:
    """A cache key per text: its token ids without the padding."""
    lengths = attention_mask.sum(1).tolist()
    return [row[:n].cpu().numpy().tobytes() for row, n in zip(input_ids, lengths)]


def place_anchors(pooled: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Class anchors in the image tower's pooled space (A, C): the batch's mean pooled output (B, C) moved along
    each unit direction by the batch's mean pooled norm, so the anchors sit where this data's features are."""
    return pooled.mean(0) + pooled.norm(dim=1).mean() * directions


class DualEncoder(SavesPretrained, nn.Module):
    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None,
                 load_pretrained_weights: bool = True):
        super().__init__()
        self.config = config
        # a text tower trained on texts padded to its full context (SigLIP) is given them so
        self.tokenizer = None if tokenizer is None else tokenizer.with_padding(config.text.pad_to_context)
        self.image_tower = ImageTower(config.image, load_pretrained_weights=load_pretrained_weights)
        self.text_tower = TextTower(config.text, load_pretrained_weights=load_pretrained_weights)
        self.image_proj = projection(config.image_projection, self.image_tower.output_dim, config.embed_dim, "image")
        self.text_proj = projection(config.text_projection, self.text_tower.output_dim, config.embed_dim, "text")
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = None
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        self.text_cache: PooledCache | None = None  # see enable_text_cache
        self.image_cache: PooledCache | None = None  # see enable_image_cache
        self.encode_chunk_size = CPU_ENCODE_CHUNK  # see encode_image; 0: one forward per batch
        self.encode_chunk_tokens = CPU_ENCODE_TEXT_TOKENS  # see encode_text; 0: one forward per length group
        self.lock_towers(image=config.image.locked, text=config.text.locked)

    # ------------------------------------------------------------------ locking (LiT)
    def lock_towers(self, image: bool = False, text: bool = False) -> None:
        """Freeze towers: no gradients, and kept in eval mode so BatchNorm statistics stay put."""
        for tower, locked in ((self.image_tower, image), (self.text_tower, text)):
            for p in tower.parameters():
                p.requires_grad_(not locked)
        self.config.image.locked, self.config.text.locked = image, text
        if not text:
            self.text_cache = None
        if not image:
            self.image_cache = None  # an unlocked tower's output changes as it trains
        self.train(self.training)

    def enable_text_cache(self, max_entries: int = 200_000) -> None:
        """Memoise a locked text tower's pooled output per token sequence (LiT): captions repeat
        across steps, and a frozen tower gives the same output for them every time."""
        if not self.config.text.locked:
            raise ValueError("the text cache is only valid for a locked text tower")
        self.text_cache = PooledCache(max_entries)

    def enable_image_cache(self, max_entries: int = 500_000) -> None:
        """Memoise a locked image tower's pooled output per image (its uint8 pixels' digest): without
        augmentation every epoch shows the tower the same images, so each is computed once (LiT)."""
        if not self.config.image.locked:
            raise ValueError("the image cache is only valid for a locked image tower")
        self.image_cache = PooledCache(max_entries)

    def train(self, mode: bool = True) -> DualEncoder:
        super().train(mode)
        if self.config.image.locked:
            self.image_tower.eval()
        if self.config.text.locked:
            self.text_tower.eval()
        return self

    # ------------------------------------------------------------------ encoding
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images: uint8 (B, H, W, 3) / (B, 3, H, W), or float normalised as by ``image_transform``.

        On the CPU, with the image tower in eval mode (a locked tower always is), a batch larger than
        ``encode_chunk_size`` is encoded in chunks of that size: the same features (and gradients, if
        any), computed with the activations in cache. In train mode BatchNorm needs the whole batch."""
        features = self.image_proj(self.image_pooled(images))  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def image_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled output (B, C), before the projection (from the cache when it is on)."""
        chunk = self.encode_chunk_size if self._chunks_pay(self.image_tower, images.device) else 0
        if self.image_cache is not None and images.dtype == torch.uint8:
            keys = pixel_digests(images)
            return self.image_cache.pooled(keys, lambda rows: in_row_chunks(
                self.image_tower.forward_pooled, chunk, images[rows]), images.device)  # (B, C)
        return in_row_chunks(self.image_tower.forward_pooled, chunk, images)  # (B, C)

    @staticmethod
    def _chunks_pay(tower: nn.Module, device: torch.device) -> bool:
        """Cache-sized chunks: on the CPU (GPUs want big batches), in eval mode (BatchNorm in train mode
        needs the whole batch)."""
        return device.type == "cpu" and not tower.training

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; pass token ids to encode_text")
        return self.tokenizer(texts)

    def encode_text(self, text: str | Sequence[str] | dict[str, torch.Tensor], normalize: bool = True
                    ) -> torch.Tensor:
        """text: strings (tokenised here) or {"input_ids", "attention_mask"} tensors.

        On the CPU, with the text tower in eval mode, captions of similar length are encoded in forwards of
        about ``encode_chunk_tokens`` tokens (see ``TextTower.forward_pooled``): the same features."""
        tokens = text if isinstance(text, dict) else self.tokenize(text)
        device = self.logit_scale.device
        input_ids, attention_mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        chunk = self.encode_chunk_tokens if self._chunks_pay(self.text_tower, device) else 0
        if self.text_cache is None:
            pooled = self.text_tower.forward_pooled(input_ids, attention_mask, chunk)  # (B, C)
        else:
            pooled = self.text_cache.pooled(token_keys(input_ids, attention_mask),
                                            lambda rows: self.text_tower.forward_pooled(
                                                input_ids[rows], attention_mask[rows], chunk), device)  # (B, C)
        features = self.text_proj(pooled)  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                anchors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The batch's embeddings, and with ``anchors`` (see ``vlpt.train.anchors``: unit ``directions`` (A, C) in
        the image tower's pooled space with their names' ``input_ids`` / ``attention_mask``) the anchors' too:
        an anchor's image side is the batch's mean pooled output moved along its direction by the batch's mean
        pooled norm (both held constant), so it sits where this data's features are."""
        pooled = self.image_pooled(images)
        out = {
            "image_features": F.normalize(self.image_proj(pooled), dim=-1),
            "text_features": self.encode_text({"input_ids": input_ids, "attention_mask": attention_mask}),
            "logit_scale": self.logit_scale.clamp(0, self.config.max_logit_scale).exp(),
            "logit_bias": self.logit_bias,
        }
        if anchors is not None:
            placed = place_anchors(pooled.detach(), anchors["directions"])
            out["anchor_image_features"] = F.normalize(self.image_proj(placed), dim=-1)
            out["anchor_text_features"] = self.encode_text({"input_ids": anchors["input_ids"],
                                                            "attention_mask": anchors["attention_mask"]})
        return out

    # ------------------------------------------------------------------ save / load
    def write_files(self, directory: Path) -> None:
        write_model_files(directory, to_dict(self.config_for_saving()), self, self.tokenizer)

    def export(self, to: str, directory: str | Path) -> Path:
        """Write this model as a transformers ``CLIPModel`` (``to`` hf-clip) / ``SiglipModel`` (hf-siglip) folder
        or an OpenCLIP ``local-dir`` folder (open-clip), loadable by that library; NotRepresentable (a
        ValueError) names what the format has no place for. See ``vlpt.interop``."""
        from vlpt.interop import export_model  # interop imports this module

        return export_model(self, to, directory)

    def config_for_saving(self) -> ModelConfig:
        """The config with the text tower's HF config filled in, so loading needs no hub access."""
        config = copy.deepcopy(self.config)
        config.text.hf_config = self.text_tower.hf_config_dict()
        return config

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
        directory = Path(directory)
        data = read_model_config(directory)
        if data.get("model_type") is not None:  # a captioner, generator or task model keeps its encoder inside
            raise ModelLoadError(f"{directory / CONFIG_NAME}: a {data['model_type']} model, not a dual encoder")
        config = from_dict(ModelConfig, data, where=str(directory / CONFIG_NAME))
        tokenizer = read_tokenizer(directory, config.text.context_length)
        with described_by(directory / CONFIG_NAME):
            model = cls(config, tokenizer, load_pretrained_weights=False)
        return load_weights(model, directory, device)


# ----------------------------------------------------------------------------- files shared by every vlpt model

def write_model_files(directory: Path, config: dict, model: nn.Module, tokenizer: Tokenizer | None) -> None:
    """config.json + model.safetensors (+ tokenizer/): the layout of every vlpt model folder."""
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory / TOKENIZER_DIR)


def find_model_dir(path: str | Path) -> Path:
    """A model folder, or a run folder holding ``model/``."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_NAME).exists():
            return candidate
    raise FileNotFoundError(f"no vlpt model in {path} (expected {CONFIG_NAME} there or in {path / 'model'}); "
                            f"nor a transformers CLIP / SigLIP folder (config.json with model_type clip or siglip), "
                            f"an OpenCLIP folder (open_clip_config.json) or an OpenCLIP 'ARCH,FILE'")


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def described_by(config_path: Path) -> Iterator[None]:
    """Building a model from a saved config: a ValueError (a value no tower accepts, such as an unknown
    timm model) becomes a ModelLoadError naming the config file."""
    try:
        yield
    except ModelLoadError:
        raise
    except ValueError as err:
        raise ModelLoadError(f"{config_path}: cannot build the model it describes ({_short(err)})") from err


def read_model_config(directory: Path) -> dict:
    """A model folder's config.json as a dict; FileNotFoundError / ModelLoadError naming the file."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a vlpt model folder (no {CONFIG_NAME})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ModelLoadError(f"{path}: not valid JSON ({_short(err)})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object (the model's config), got {type(data).__name__}")
    return data


def read_tokenizer(directory: Path, context_length: int) -> Tokenizer | None:
    path = Path(directory) / TOKENIZER_DIR
    if not path.exists():
        return None
    try:
        return Tokenizer.from_pretrained(path, context_length)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # transformers reading bad files
        raise ModelLoadError(f"{path}: not a readable tokenizer ({_short(err)})") from err
    except Exception as err:  # the Rust tokenizers library raises plain Exception for a malformed tokenizer.json
        if type(err) is not Exception:
            raise
        raise ModelLoadError(f"{path}: not a readable tokenizer ({_short(err)})") from err


def load_weights(model: nn.Module, directory: Path, device: str | torch.device = "cpu"):
    """Load ``directory``'s model.safetensors into ``model`` (eval mode, on ``device``); FileNotFoundError or
    ModelLoadError naming the file when it is missing, corrupt, truncated or made for another model."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME} (the model's weights); is the folder complete?")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{path}: not a readable safetensors file, corrupt or truncated ({err})") from err
    load_matching_state(model, state, f"{path}: the weights do not match the model its {CONFIG_NAME} describes")
    return model.to(device).eval()


def load_matching_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)`` when every tensor is there with the model's shape; otherwise a
    ModelLoadError starting with ``what`` that counts the missing, unexpected and reshaped tensors."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in state and state[k].shape != v.shape]
    if missing or unexpected or reshaped:
        parts = [f"{len(names)} {kind} (first: {names[0]})" for names, kind in
                 ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape, file vs model"))
                 if names]
        raise ModelLoadError(f"{what}: {'; '.join(parts)}")
    model.load_state_dict(state)


class BuiltOnEncoder(SavesPretrained):
    """Save / load for a model built on a dual encoder (captioner, generator): subclasses set ``MODEL_TYPE``,
    ``CONFIG_SECTION``, ``CONFIG_CLASS``, ``DESCRIPTION`` and keep ``config`` and ``dual_encoder``."""

    MODEL_TYPE: str
    CONFIG_SECTION: str
    CONFIG_CLASS: type
    DESCRIPTION: str

    def write_files(self, directory: Path) -> None:
        write_with_encoder(directory, self.MODEL_TYPE, self.CONFIG_SECTION, self.config, self, self.dual_encoder)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu"):
        directory = Path(directory)
        config, dual = read_with_encoder(directory, cls.MODEL_TYPE, cls.CONFIG_SECTION, cls.CONFIG_CLASS,
                                         cls.DESCRIPTION)
        with described_by(directory / CONFIG_NAME):
            model = cls(config, dual)
        return load_weights(model, directory, device)


def write_with_encoder(directory: Path, model_type: str, section: str, config, model: nn.Module,
                       dual_encoder: DualEncoder) -> None:
    """A model built on a dual encoder (captioner, generator): its own config under ``section`` next to
    the dual encoder's, all weights in one file."""
    data = {"model_type": model_type, section: to_dict(config), "dual_encoder": to_dict(dual_encoder.config_for_saving())}
    write_model_files(directory, data, model, dual_encoder.tokenizer)


def read_with_encoder(directory: Path, model_type: str, section: str, config_cls: type, what: str):
    """(config, freshly built dual encoder) of a folder written by ``write_with_encoder``; weights are
    loaded afterwards with ``load_weights`` on the whole model."""
    data = read_model_config(directory)
    if data.get("model_type") != model_type:
        kind = data.get("model_type") or "a dual encoder"
        raise ModelLoadError(f"{directory} holds {kind}, not {what} ({model_type})")
    where = str(directory / CONFIG_NAME)
    for key in (section, "dual_encoder"):
        if not isinstance(data.get(key), dict):
            raise ModelLoadError(f"{where}: no {key!r} section (a JSON object), so not a complete {what}")
    config = from_dict(config_cls, data[section], where=f"{where}:{section}")
    dual_config = from_dict(ModelConfig, data["dual_encoder"], where=f"{where}:dual_encoder")
    tokenizer = read_tokenizer(directory, dual_config.text.context_length)
    with described_by(directory / CONFIG_NAME):
        return config, DualEncoder(dual_config, tokenizer, load_pretrained_weights=False)
