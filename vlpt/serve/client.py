"""``vlpt.Client``: the Python client of ``vlpt serve`` (standard library only, so ``import vlpt`` stays fast).

    >>> client = vlpt.Client("http://127.0.0.1:8000")
    >>> client.search(text="a red circle", k=5)          # [{"id", "path", "caption", "label", "score", ...}]
    >>> client.search(image="photo.png", modality="text")
    >>> client.embed(texts=["a red circle"])["text"]     # numpy (1, D)
    >>> client.answer("photo.png", "what color is the circle?")

Images are file paths, bytes or PIL images; they travel base64-encoded in JSON. A 4xx or 5xx answer raises
``ClientError`` with the server's message and status.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class ClientError(ValueError):
    """The server refused a request (4xx) or failed (5xx); ``status`` and the server's ``message``."""

    def __init__(self, status: int, message: str, body: dict | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body = status, message, body or {}


def encode_image(image) -> str:
    """A path, bytes or a PIL image -> base64 text (PIL images as PNG)."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    elif hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise TypeError(f"an image is a file path, bytes or a PIL image, got {type(image).__name__}")
    return base64.b64encode(data).decode("ascii")


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    # ------------------------------------------------------------------ plumbing
    def request(self, method: str, path: str, body: dict | None = None, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                content = resp.read()
                if raw:
                    return content
                kind = resp.headers.get("Content-Type", "")
                return json.loads(content) if kind.startswith("application/json") else content.decode()
        except urllib.error.HTTPError as err:
            content = err.read()
            try:
                body = json.loads(content)
                message = body.get("error", content.decode(errors="replace"))
            except ValueError:
                body, message = None, content.decode(errors="replace")
            raise ClientError(err.code, message, body) from None

    def post(self, path: str, body: dict, raw: bool = False):
        return self.request("POST", path, {k: v for k, v in body.items() if v is not None}, raw)

    # ------------------------------------------------------------------ search
    def search(self, text: str | None = None, image=None, embedding: Sequence[float] | None = None,
               item: int | None = None, k: int = 10, modality: str = "image", dedup: bool = False) -> list[dict]:
        """The ``k`` nearest items of the ``modality`` index to one query: a text, an image, an embedding,
        or an indexed image's id (``item``)."""
        body = {"text": text, "image": None if image is None else encode_image(image),
                "embedding": None if embedding is None else [float(v) for v in np.asarray(embedding).ravel()],
                "item": item, "k": k, "modality": modality, "dedup": dedup}
        return self.post("/search", body)["results"]

    def embed(self, texts: Sequence[str] | None = None, images: Sequence | None = None) -> dict[str, np.ndarray]:
        """L2-normalised embeddings: ``{"text": (T, D), "image": (I, D)}`` for what was given."""
        out = self.post("/embed", {"texts": None if texts is None else list(texts),
                                   "images": None if images is None else [encode_image(i) for i in images]})
        return {k: np.asarray(v, np.float32) for k, v in out.items() if k in ("text", "image")}

    # ------------------------------------------------------------------ applications
    def classify(self, image, labels: Sequence[str]) -> dict:
        return self.post("/classify", {"image": encode_image(image), "labels": list(labels)})

    def caption(self, image, beam: int = 1) -> str:
        return self.post("/caption", {"image": encode_image(image), "beam": beam})["caption"]

    def answer(self, image, question: str) -> dict:
        return self.post("/answer", {"image": encode_image(image), "question": question})

    def match(self, image, text: str) -> float:
        return self.post("/match", {"image": encode_image(image), "text": text})["probability"]

    def generate(self, text: str, seed: int = 0, steps: int | None = None, guidance: float | None = None) -> bytes:
        """A PNG (bytes) drawn from ``text``."""
        return self.post("/generate", {"text": text, "seed": seed, "steps": steps, "guidance": guidance}, raw=True)

    # ------------------------------------------------------------------ items and status
    def item(self, item_id: int, modality: str = "image") -> dict:
        return self.request("GET", f"/items/{int(item_id)}?modality={urllib.parse.quote(modality)}")

    def image(self, item_id: int) -> bytes:
        return self.request("GET", f"/items/{int(item_id)}/image", raw=True)

    def health(self) -> dict:
        return self.request("GET", "/health")

    def ready(self) -> dict:
        return self.request("GET", "/ready")

    def meta(self) -> dict:
        return self.request("GET", "/meta")

    def metrics(self) -> str:
        return self.request("GET", "/metrics", raw=True).decode()
