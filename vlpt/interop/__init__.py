"""Checkpoint interoperability: Hugging Face transformers CLIP / SigLIP and OpenCLIP, in and out.

``foreign_format(ref)`` tells whether a model reference is one of theirs, ``import_model(ref)`` turns it into a
vlpt ``DualEncoder`` (what ``vlpt.load_model`` and every ``--model`` do for such a reference), and
``export_model(model, to, out)`` writes a vlpt dual encoder in their format (``vlpt export``). A reference is:

- a transformers ``CLIPModel`` / ``SiglipModel`` folder (``config.json`` with ``model_type`` clip / siglip);
- an OpenCLIP folder (``open_clip_config.json`` + weights; ``local-dir:PATH`` as OpenCLIP writes it too);
- an OpenCLIP weights file with its architecture, ``ARCH,FILE`` (as CLIP_benchmark's ``--pretrained_model``):
  ARCH an OpenCLIP model name (``ViT-B-32``) or a model config ``.json``;
- ``hf-hub:ORG/NAME``: a hub repository holding either (downloaded; needs the network).

See docs/interop.md for what maps and what does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlpt.interop.common import NotRepresentable
from vlpt.io import ModelLoadError

FORMATS = ("hf-clip", "hf-siglip", "open-clip")  # what vlpt exports to
HF_HUB_PREFIX = "hf-hub:"
OPEN_CLIP_DIR_PREFIX = "local-dir:"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # files OpenCLIP's load_checkpoint reads

__all__ = ["FORMATS", "NotRepresentable", "export_model", "foreign_format", "import_model"]


def _split_arch(ref: str) -> tuple[str, str] | None:
    """``ARCH,FILE`` -> (arch, file) when FILE exists and the whole is not itself a path."""
    if "," not in ref or Path(ref).exists():
        return None
    arch, file = ref.rsplit(",", 1)
    return (arch.strip(), file.strip()) if arch.strip() and Path(file.strip()).is_file() else None


def foreign_format(ref: str | Path) -> str | None:
    """``hf`` (transformers CLIP / SigLIP folder), ``open-clip`` (folder or ARCH,FILE), ``hf-hub`` or None
    (a vlpt model or run folder, or nothing readable: the vlpt loader reports that)."""
    text = str(ref)
    if text.startswith(HF_HUB_PREFIX):
        return "hf-hub"
    if text.startswith(OPEN_CLIP_DIR_PREFIX) or _split_arch(text):
        return "open-clip"
    path = Path(text)
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
        return "open-clip"  # a bare weights file: its import asks for the architecture
    if not path.is_dir():
        return None
    if (path / "open_clip_config.json").is_file():
        return "open-clip"
    config = path / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
            return None  # the vlpt loader names what is wrong with it
        if isinstance(model_type, str) and not model_type.startswith("vlpt-"):
            return "hf"  # a transformers config.json (hf.import_hf says which model types it maps)
    return None


def import_model(ref: str | Path, arch: str | None = None, device: str | torch.device = "cpu"):
    """A vlpt ``DualEncoder`` from a transformers CLIP / SigLIP or OpenCLIP checkpoint (see the module
    docstring for the references taken); ``arch`` names an OpenCLIP weights file's architecture."""
    text = str(ref)
    kind = "open-clip" if arch is not None else foreign_format(text)
    if kind == "hf-hub":
        return import_model(_download(text[len(HF_HUB_PREFIX):]), arch, device)
    if kind == "hf":
        from vlpt.interop.hf import import_hf

        return import_hf(text, device)
    if kind == "open-clip":
        from vlpt.interop.open_clip import import_open_clip

        split = _split_arch(text) if arch is None and not text.startswith(OPEN_CLIP_DIR_PREFIX) else None
        if split:
            arch, text = split
        return import_open_clip(text, arch, device)
    raise ModelLoadError(f"{ref}: not a transformers CLIP / SigLIP folder, an OpenCLIP folder or 'ARCH,FILE'")


def _download(repo: str) -> Path:  # pragma: no cover - needs the network
    """A hub repository's config, weights and tokenizer files (the files both formats use)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"]
    return Path(snapshot_download(repo, allow_patterns=patterns))


def export_model(model, to: str, out: str | Path) -> Path:
    """Write a vlpt ``DualEncoder`` as ``to`` (hf-clip | hf-siglip | open-clip) into the folder ``out``
    (replaced atomically); NotRepresentable names what the format has no place for."""
    if to not in FORMATS:
        raise ValueError(f"unknown export format {to!r}; choose from {', '.join(FORMATS)}")
    if to == "open-clip":
        from vlpt.interop.open_clip import export_open_clip

        return export_open_clip(model, out)
    from vlpt.interop.hf import export_hf

    return export_hf(model, out, "clip" if to == "hf-clip" else "siglip")
