"""``vlpt serve``: search, embeddings and every application over HTTP (FastAPI + uvicorn), and the web page.

Endpoints (JSON bodies; an image is base64 text in JSON, or a file part of a multipart/form-data body):

    POST /search     {text | image | embedding | item, k, modality, dedup} -> {"results": [{id, path, caption, score, ...}]}
    POST /embed      {texts, images} -> {"text": [[...]], "image": [[...]]}
    POST /classify   {image, labels} -> {"label", "probabilities"}
    POST /caption    {image, beam} -> {"caption"}                      (with --caption)
    POST /answer     {image, question} -> {"answer", "probability"}    (with --vqa)
    POST /match      {image, text} -> {"probability"}                  (with --match)
    POST /generate   {text, seed, steps, guidance} -> image/png        (with --generate)
    GET  /items/{id}[?modality=text], /items/{id}/image, /health, /ready, /meta, /metrics, /openapi.json, /

Model work runs in batcher threads (``vlpt.serve.batcher``), never on the event loop; requests that arrive
together share one forward. Limits (``vlpt.serve.limits``) are checked before parsing; every refusal is a 4xx
with a JSON ``{"error": ...}``; no input gives a 5xx. Files are served only from the index's own source roots,
found by id (a request never names a path). CORS is off; the server binds 127.0.0.1 unless told otherwise.
"""

import asyncio
import base64
import dataclasses
import io
import json
import logging
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.staticfiles import StaticFiles

from vlpt.serve.batcher import Batcher
from vlpt.serve.index import item_where
from vlpt.serve.limits import Limits, LimitsMiddleware, RequestError, image_bytes, open_image, parse_limits
from vlpt.serve.sources import Preprocessing

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}
MAX_SERVED_BYTES = 64 * 2 ** 20  # an indexed file larger than this is not served
DEDUP_OVERFETCH = 4  # dedup: candidates fetched per result asked

__all__ = ["ServeConfig", "Server", "create_app", "parse_limits", "serve"]


@dataclass
class ServeConfig:
    index: Path | str | None = None  # a `vlpt index` folder
    model: str | None = None  # dual encoder for queries; default: the index's model
    caption: str | None = None  # captioner
    vqa: str | None = None  # vqa task model
    match: str | None = None  # match task model
    generate: str | None = None  # text -> image generator
    host: str = "127.0.0.1"
    port: int = 8000
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 32  # dynamic batching: largest batch (1: off)
    max_wait_ms: float = 2.0  # dynamic batching: longest a batch waits to fill
    threads: int = 1  # torch / faiss threads per worker


# ----------------------------------------------------------------------------- request and response models

def request_models(limits: Limits) -> dict[str, type[BaseModel]]:
    """The typed request bodies, with the limits as their constraints (so the OpenAPI schema states them)."""
    b64_chars = 4 * (limits.max_body_bytes // 3 + 1) + 100
    Text = Annotated[str, Field(min_length=1, max_length=limits.max_text_chars)]
    ImageField = Annotated[str, Field(min_length=1, max_length=b64_chars,
                                      description="base64 of the image file (JSON), or a file part (multipart)")]
    Finite = Annotated[float, Field(allow_inf_nan=False)]

    def not_blank(value):
        if isinstance(value, str) and not value.strip():
            raise ValueError("must contain a non-space character")
        if isinstance(value, list):
            for v in value:
                not_blank(v)
        return value

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class SearchRequest(Strict):
        """One query (exactly one of text, image, embedding, item) against the image or text index."""
        text: Text | None = None
        image: ImageField | None = None
        embedding: list[Finite] | None = Field(None, min_length=1, max_length=limits.max_dim)
        item: int | None = Field(None, ge=0, le=2 ** 62, description="an image id of the index: search by its vector")
        k: int = Field(10, ge=1, le=limits.max_k)
        modality: Literal["image", "text"] = "image"
        dedup: bool = Field(False, description="drop results near-identical to a better one")
        dedup_threshold: float = Field(0.98, gt=0, le=1)

        _blank = field_validator("text")(classmethod(lambda cls, v: not_blank(v)))

        @model_validator(mode="after")
        def one_query(self):
            given = [n for n in ("text", "image", "embedding", "item") if getattr(self, n) is not None]
            if len(given) != 1:
                raise ValueError(f"give exactly one of text, image, embedding, item (got {', '.join(given) or 'none'})")
            return self

    class EmbedRequest(Strict):
        texts: list[Text] | None = Field(None, min_length=1, max_length=limits.max_texts)
        images: list[ImageField] | None = Field(None, min_length=1, max_length=limits.max_images)

        _blank = field_validator("texts")(classmethod(lambda cls, v: not_blank(v)))

        @model_validator(mode="after")
        def something(self):
            if self.texts is None and self.images is None:
                raise ValueError("give texts, images or both")
            return self

    class ClassifyRequest(Strict):
        image: ImageField
        labels: list[Text] = Field(min_length=2, max_length=limits.max_labels)

        _blank = field_validator("labels")(classmethod(lambda cls, v: not_blank(v)))

    class CaptionRequest(Strict):
        image: ImageField
        beam: int = Field(1, ge=1, le=limits.max_beam)

    class AnswerRequest(Strict):
        image: ImageField
        question: Text

        _blank = field_validator("question")(classmethod(lambda cls, v: not_blank(v)))

    class MatchRequest(Strict):
        image: ImageField
        text: Text

        _blank = field_validator("text")(classmethod(lambda cls, v: not_blank(v)))

    class GenerateRequest(Strict):
        text: Text
        seed: int = Field(0, ge=0, le=2 ** 31 - 1)
        steps: int | None = Field(None, ge=1, le=limits.max_generate_steps)
        guidance: float | None = Field(None, ge=0, le=50, allow_inf_nan=False)

        _blank = field_validator("text")(classmethod(lambda cls, v: not_blank(v)))

    return {m.__name__: m for m in (SearchRequest, EmbedRequest, ClassifyRequest, CaptionRequest, AnswerRequest,
                                    MatchRequest, GenerateRequest)}


class SearchResult(BaseModel):
    id: int
    score: float
    path: str | None = None
    caption: str | None = None
    label: str | None = None
    image_id: int | None = None
    image_url: str | None = None


class SearchResponse(BaseModel):
    results: list[SearchResult]
    modality: str


class EmbedResponse(BaseModel):
    text: list[list[float]] | None = None
    image: list[list[float]] | None = None


class ClassifyResponse(BaseModel):
    label: str
    probabilities: dict[str, float]


class CaptionResponse(BaseModel):
    caption: str


class AnswerResponse(BaseModel):
    answer: str
    probability: float


class MatchResponse(BaseModel):
    probability: float


class ErrorResponse(BaseModel):
    error: str
    status: int


def _multipart_schema(schema: dict) -> dict:
    """The JSON schema of a body with image fields as file parts."""
    schema = json.loads(json.dumps(schema))
    for name, prop in schema.get("properties", {}).items():
        if name == "image":
            schema["properties"][name] = {"type": "string", "format": "binary"}
        elif name == "images":
            schema["properties"][name] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return schema


def _body_doc(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema()
    content = {"application/json": {"schema": schema}}
    if "image" in schema["properties"] or "images" in schema["properties"]:
        content["multipart/form-data"] = {"schema": _multipart_schema(schema)}
    return {"requestBody": {"required": True, "content": content}}


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "malformed body"), (404, "no such item"), (413, "body or image over the limits"),
    (415, "unsupported content type"), (422, "invalid request (the message names the field)"),
    (429, "too many requests in flight"), (503, "not ready yet, or timed out"))}


async def parse_body(request, model: type[BaseModel]) -> BaseModel:
    """A JSON or multipart/form-data body validated as ``model``; RequestError (4xx) otherwise."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=64, max_fields=1024)
        except Exception as err:  # noqa: BLE001 - python-multipart / starlette: a malformed body
            if isinstance(err, RequestError):
                raise
            raise RequestError(400, f"malformed multipart/form-data body ({err})") from None
        data: dict = {}
        lists = {n for n, f in model.model_fields.items() if "list" in str(f.annotation)}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                value = await value.read()
            if key in ("image", "images") and isinstance(value, (bytes, bytearray)):
                value = base64.b64encode(value).decode("ascii")
            if key in lists:
                data.setdefault(key, []).append(value)
            elif key in data:
                data[key] = [data[key], value] if not isinstance(data[key], list) else [*data[key], value]
            else:
                data[key] = value
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise RequestError(422, _validation_message(err)) from None
    if kind not in ("application/json", ""):
        raise RequestError(415, f"unsupported content type {kind!r}: send application/json or multipart/form-data")
    body = await request.body()
    if not body:
        raise RequestError(422, "empty body: send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise RequestError(422, _validation_message(err)) from None


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        where = ".".join(str(p) for p in e.get("loc", ())) or "body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            return f"the body is not valid JSON ({msg})"
        parts.append(f"{where}: {msg}")
    more = f" (+{err.error_count() - 5} more)" if err.error_count() > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


# ----------------------------------------------------------------------------- the server state

class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("vlpt_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("vlpt_request_seconds", "request latency by route", ["route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch = Histogram("vlpt_batch_size", "items per model call, by batcher", ["batcher"],
                               registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.in_flight = Gauge("vlpt_requests_in_flight", "requests being served", registry=self.registry)
        self.items = Gauge("vlpt_index_items", "vectors in each index", ["modality"], registry=self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch_done(self, name: str, size: int) -> None:
        self.batch.labels(name).observe(size)


class Server:
    """What the endpoints use: the index, the models (loaded in a background thread: /ready says when) and
    their batchers."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.limits = config.limits
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.index = None
        self.dual = self.captioner = self.vqa = self.matcher = self.generator = None
        self.batchers: dict[str, Batcher] = {}
        self._tar_members: OrderedDict[Path, dict] = OrderedDict()
        self._tar_lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        try:
            self._load()
            self.ready.set()
            log.info("ready: %s", ", ".join(self.features()))
        except Exception as err:  # noqa: BLE001 - reported by /ready and in the log
            self.load_error = f"{type(err).__name__}: {err}"
            log.exception("loading failed")

    def _load(self) -> None:
        from vlpt.factory import load_captioner, load_dual_encoder, load_generator, load_task_model

        config = self.config
        threads = max(1, config.threads)
        torch.set_num_threads(threads)
        if config.index is not None:
            import faiss

            from vlpt.serve.index import IndexReader

            faiss.omp_set_num_threads(threads)
            self.index = IndexReader.open(config.index)
            for modality, c in self.index.collections.items():
                self.metrics.items.labels(modality).set(c.count)
        model_spec = config.model or (self.index.manifest["model"]["path"] if self.index else None)
        if model_spec is not None:
            if self.index is not None:
                check_model_matches(config.index, model_spec)
            from vlpt.serve.index import inference_ready

            self.dual = inference_ready(load_dual_encoder(model_spec).eval(), in_place=True)  # as `vlpt index` embeds
            if self.index is not None and self.dual.config.embed_dim != self.index.manifest["embed_dim"]:
                raise ValueError(f"the model embeds in {self.dual.config.embed_dim} dimensions, the index holds "
                                 f"{self.index.manifest['embed_dim']}")
            self.dual_prep = Preprocessing.of(self.dual)
            # /classify's temperature, fixed for a loaded model
            self.logit_scale = float(self.dual.logit_scale.detach().clamp(0, self.dual.config.max_logit_scale).exp())
        if config.caption:
            self.captioner = load_captioner(config.caption).eval()
            self.caption_prep = Preprocessing.of(self.captioner.dual_encoder)
        if config.vqa:
            self.vqa = load_task_model(config.vqa).eval()
            if self.vqa.config.task != "vqa":
                raise ValueError(f"--vqa {config.vqa} is a {self.vqa.config.task} model, not a vqa model")
            self.vqa_prep = Preprocessing.of(self.vqa.encoder)
        if config.match:
            self.matcher = load_task_model(config.match).eval()
            if self.matcher.config.task != "match":
                raise ValueError(f"--match {config.match} is a {self.matcher.config.task} model, not a match model")
            self.match_prep = Preprocessing.of(self.matcher.encoder)
        if config.generate:
            self.generator = load_generator(config.generate).eval()
        self._start_batchers()

    def _start_batchers(self) -> None:
        size, wait = self.config.max_batch, self.config.max_wait_ms / 1000
        make = lambda name, fn, n=size: Batcher(name, fn, n, wait, on_batch=self.metrics.batch_done)  # noqa: E731
        if self.dual is not None:
            self.batchers["text"] = make("text", self._embed_texts)
            self.batchers["image"] = make("image", self._embed_images)
        if self.index is not None:
            self.batchers["search"] = make("search", self._search_batch)
        if self.captioner is not None:
            self.batchers["caption"] = make("caption", self._caption_batch)
        if self.vqa is not None:
            self.batchers["answer"] = make("answer", self._answer_batch)
        if self.matcher is not None:
            self.batchers["match"] = make("match", self._match_batch)
        if self.generator is not None:
            self.batchers["generate"] = make("generate", self._generate_batch, 1)

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()

    def features(self) -> list[str]:
        c = self.config
        return [name for name, on in (("search", c.index is not None), ("embed", c.model or c.index),
                                      ("classify", c.model or c.index), ("caption", c.caption), ("answer", c.vqa),
                                      ("match", c.match), ("generate", c.generate)) if on]

    # ------------------------------------------------------------------ model work (batcher threads)
    @torch.inference_mode()
    def _embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.dual.encode_text(texts).float().numpy())

    @torch.inference_mode()
    def _embed_images(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        return list(self.dual.encode_image(torch.stack(tensors)).float().numpy())

    def _search_batch(self, queries: list[tuple[str, np.ndarray, int]]) -> list:
        out: list = [None] * len(queries)
        for modality in {q[0] for q in queries}:
            rows = [i for i, q in enumerate(queries) if q[0] == modality]
            k = max(queries[i][2] for i in rows)
            collection = self.index.collections[modality]
            scores, ids = collection.search(np.stack([queries[i][1] for i in rows]), min(k, collection.count))
            for r, i in enumerate(rows):
                out[i] = (scores[r, :queries[i][2]], ids[r, :queries[i][2]])
        return out

    @torch.inference_mode()
    def _caption_batch(self, items: list[tuple[torch.Tensor, int]]) -> list[str]:
        from vlpt.models.decoding import DecodingConfig

        out: list = [None] * len(items)
        for beam in {b for _, b in items}:
            rows = [i for i, (_, b) in enumerate(items) if b == beam]
            decoding = DecodingConfig(strategy="beam" if beam > 1 else "greedy", beam=beam)
            captions = self.captioner.generate_caption(torch.stack([items[i][0] for i in rows]), decoding)
            for i, c in zip(rows, captions):
                out[i] = c
        return out

    def _answer_batch(self, items: list[tuple[torch.Tensor, str]]) -> list[tuple[str, float]]:
        return self.vqa.answer(torch.stack([t for t, _ in items]), [q for _, q in items])

    def _match_batch(self, items: list[tuple[torch.Tensor, str]]) -> list[float]:
        return self.matcher.match(torch.stack([t for t, _ in items]), [q for _, q in items])

    def _generate_batch(self, items: list[dict]) -> list[bytes]:
        from PIL import Image

        out = []
        for item in items:
            images = self.generator.generate_images([item["text"]], num_inference_steps=item["steps"],
                                                    guidance_scale=item["guidance"], seed=item["seed"],
                                                    progress=False).numpy()
            buf = io.BytesIO()
            Image.fromarray(images[0]).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out

    # ------------------------------------------------------------------ helpers for the endpoints
    def need(self, what: str):
        if not self.ready.is_set():
            raise RequestError(503, f"not ready: {self.load_error}" if self.load_error else
                                    "not ready yet: models and index are loading (see GET /ready)")
        return self.batchers[what]

    async def tensor(self, value, prep: Preprocessing, what: str = "image") -> torch.Tensor:
        """A request image (base64 or bytes) -> a model-ready tensor, decoded in a worker thread."""
        data = image_bytes(value, what)
        return await run_in_threadpool(lambda: prep.from_pil(open_image(data, self.limits, what)))

    def result_rows(self, modality: str, scores: np.ndarray, ids: np.ndarray) -> list[dict]:
        keep = [(float(s), int(i)) for s, i in zip(scores, ids) if i >= 0]
        if not keep:
            return []
        collection = self.index.collections[modality]
        rows = collection.rows([i for _, i in keep])
        results = []
        if modality == "image":
            for (score, item_id), row in zip(keep, rows):
                results.append({"id": item_id, "score": score, "path": item_where(row), "caption": row["caption"],
                                "label": row["label"], "image_id": item_id, "image_url": f"/items/{item_id}/image"})
        else:
            image_ids = [i if i is not None and i >= 0 else None for i in (row["image_id"] for row in rows)]
            known = [i for i in image_ids if i is not None]
            linked = {}
            if known and "image" in self.index.collections:
                linked = dict(zip(known, self.index.collections["image"].rows(known)))
            for (score, item_id), row, image_id in zip(keep, rows, image_ids):
                image_row = linked.get(image_id)
                path = None if image_row is None else item_where(image_row)
                results.append({"id": item_id, "score": score, "path": path, "caption": row["caption"],
                                "label": None if image_row is None else image_row["label"], "image_id": image_id,
                                "image_url": None if image_id is None else f"/items/{image_id}/image"})
        return results

    def dedup(self, modality: str, scores: np.ndarray, ids: np.ndarray, k: int, threshold: float):
        collection = self.index.collections[modality]
        kept_s, kept_i = [], []
        kept_v = np.empty((min(k, len(ids)), self.index.manifest["embed_dim"]), np.float32)  # filled, not re-stacked
        for s, i in zip(scores, ids):
            if i < 0:
                continue
            v = collection.vector(int(i))
            n = len(kept_i)
            if n and float(np.max(kept_v[:n] @ v)) >= threshold:
                continue
            kept_s.append(s)
            kept_i.append(i)
            kept_v[n] = v
            if len(kept_i) == k:
                break
        return np.array(kept_s, np.float32), np.array(kept_i, np.int64)

    # ------------------------------------------------------------------ files of the index
    def item_file(self, item_id: int) -> tuple[bytes | Path, str]:
        """The image file of image item ``item_id``: (path or bytes, media type). Only files inside the item's
        source root (a folder source's folder, a shard of a shard source) are ever read."""
        from vlpt.data.files import resolve_inside

        collection = self.index.collections.get("image") if self.index else None
        if collection is None or not 0 <= item_id < collection.count:
            raise RequestError(404, f"no image item {item_id}")
        row = collection.rows([item_id])[0]
        source = self.index.source(row["source"])
        root = Path(source["root"])
        if source["kind"] == "folder":
            try:
                path = resolve_inside(root, row["path"], f"item {item_id}")
            except (ValueError, OSError):  # UnsafePathError is a ValueError, FileNotFoundError an OSError
                raise RequestError(404, f"the file of item {item_id} is no longer available inside its root") from None
            kind = IMAGE_TYPES.get(path.suffix.lower())
            if kind is None or path.stat().st_size > MAX_SERVED_BYTES:
                raise RequestError(404, f"item {item_id} is not a file the server serves")
            return path, kind
        if source["kind"] == "shards":
            name, member = row["path"], row["member"]
            if not member or "/" in name or "\\" in name or name in ("", ".", ".."):
                raise RequestError(404, f"item {item_id} has no servable image")
            shard = (root / name).resolve()
            if not shard.is_relative_to(root) or not shard.is_file():
                raise RequestError(404, f"the shard of item {item_id} is no longer available")
            data = self._tar_member(shard, member)
            kind = IMAGE_TYPES.get(Path(member).suffix.lower(), "application/octet-stream")
            return data, kind
        raise RequestError(404, f"item {item_id} has no image")

    def _tar_member(self, shard: Path, member: str) -> bytes:
        with self._tar_lock:
            table = self._tar_members.get(shard)
            if table is None:
                table = {}
                with tarfile.open(shard, "r:") as tar:
                    for info in tar:
                        if info.isfile() and info.size <= MAX_SERVED_BYTES:
                            table.setdefault(info.name, (info.offset_data, info.size))
                self._tar_members[shard] = table
                while len(self._tar_members) > 16:
                    self._tar_members.popitem(last=False)
            self._tar_members.move_to_end(shard)
        found = table.get(member)
        if found is None:
            raise RequestError(404, f"{member} is not in its shard any more")
        offset, size = found
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)


# ----------------------------------------------------------------------------- the app

def create_app(config: ServeConfig, load: bool = True):
    """The ASGI app: FastAPI wrapped in ``LimitsMiddleware``. ``load``: start loading models and index in a
    background thread when the app starts (False: the caller calls ``app.state.server.load()``)."""
    from contextlib import asynccontextmanager

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    server = Server(config)
    models = request_models(config.limits)
    c = config

    @asynccontextmanager
    async def lifespan(app):
        if load:
            threading.Thread(target=server.load, name="vlpt-load", daemon=True).start()
        yield
        server.close()

    app = FastAPI(title="vlpt serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Search an index built by `vlpt index`, embed texts and images, and run the loaded "
                              "applications. Images: base64 in JSON, or file parts in multipart/form-data. Every "
                              "error is a JSON {error, status}. The interactive docs pages are off (they load "
                              "scripts from a CDN); this schema is complete.")
    app.state.server = server

    def error(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message, "status": status}, status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(request, err: RequestError):
        return error(err.status, err.message, {"Retry-After": "1"} if err.status in (429, 503) else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in err.errors()[:5]]
        return error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, err: ClientDisconnect):  # nobody reads this answer; counted as a 499
        return error(499, "the client closed the connection before sending its whole body")

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):  # a bug: logged, and a JSON 500 all the same
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=err)
        return error(500, "internal error (logged by the server)")

    json_only = lambda model: {"responses": {**ERRORS, 200: {"model": model}}}  # noqa: E731

    # ------------------------------------------------------------------ search and embeddings
    if c.index is not None:
        SearchRequest = models["SearchRequest"]

        @app.post("/search", summary="the k nearest items to a text, image, embedding or indexed item",
                  openapi_extra=_body_doc(SearchRequest), **json_only(SearchResponse))
        async def search(request: Request):
            batcher = server.need("search")
            req = await parse_body(request, SearchRequest)
            collection = server.index.collections.get(req.modality)
            if collection is None:
                raise RequestError(422, f"this index has no {req.modality} index (it holds "
                                        f"{', '.join(server.index.collections) or 'nothing'})")
            if req.text is not None:
                vector = await server.need("text").submit(req.text)
            elif req.image is not None:
                vector = await server.need("image").submit(await server.tensor(req.image, server.dual_prep))
            elif req.item is not None:
                images = server.index.collections.get("image")
                if images is None or req.item >= images.count:
                    raise RequestError(404, f"no image item {req.item}")
                vector = images.vector(req.item)
            else:
                vector = np.asarray(req.embedding, np.float32)
                if len(vector) != server.index.manifest["embed_dim"]:
                    raise RequestError(422, f"embedding has {len(vector)} values; this index's vectors have "
                                            f"{server.index.manifest['embed_dim']}")
                norm = float(np.linalg.norm(vector))
                if not norm > 0 or not np.isfinite(norm):
                    raise RequestError(422, "embedding must have a finite, non-zero length")
                vector = vector / norm
            fetch = min(req.k * DEDUP_OVERFETCH, collection.count) if req.dedup else req.k
            scores, ids = await batcher.submit((req.modality, vector, fetch))
            if req.dedup:
                scores, ids = server.dedup(req.modality, scores, ids, req.k, req.dedup_threshold)
            return JSONResponse({"results": server.result_rows(req.modality, scores, ids), "modality": req.modality})

        @app.get("/items/{item_id}", summary="an indexed item's metadata", responses=ERRORS)
        async def item(item_id: Annotated[int, PathParam(ge=0, le=2 ** 62)],
                       modality: Annotated[Literal["image", "text"], Query()] = "image"):
            server.need("search")
            collection = server.index.collections.get(modality)
            if collection is None or item_id >= collection.count:
                raise RequestError(404, f"no {modality} item {item_id}")
            row = collection.rows([item_id])[0]
            row["id"] = item_id
            if modality == "image":
                row["image_url"] = f"/items/{item_id}/image"
            elif row.get("image_id") is not None and row["image_id"] >= 0:
                row["image_url"] = f"/items/{row['image_id']}/image"
            return JSONResponse(row)

        @app.get("/items/{item_id}/image", summary="an indexed image item's file", response_class=Response,
                 responses={**ERRORS, 200: {"content": {t: {} for t in sorted(set(IMAGE_TYPES.values()))},
                                            "description": "the image file"}})
        async def item_image(item_id: Annotated[int, PathParam(ge=0, le=2 ** 62)]):
            server.need("search")
            found, kind = await run_in_threadpool(server.item_file, item_id)
            headers = {"Cache-Control": "public, max-age=3600", "Content-Disposition": "inline"}
            if isinstance(found, Path):
                return FileResponse(found, media_type=kind, headers=headers)
            return Response(found, media_type=kind, headers=headers)

    if c.index is not None or c.model is not None:
        EmbedRequest, ClassifyRequest = models["EmbedRequest"], models["ClassifyRequest"]

        @app.post("/embed", summary="L2-normalised embeddings of texts and/or images",
                  openapi_extra=_body_doc(EmbedRequest), **json_only(EmbedResponse))
        async def embed(request: Request):
            server.need("text")
            req = await parse_body(request, EmbedRequest)
            out = {}
            if req.texts:
                vectors = await asyncio.gather(*(server.batchers["text"].submit(t) for t in req.texts))
                out["text"] = [np.round(v, 6).tolist() for v in vectors]
            if req.images:
                tensors = [await server.tensor(img, server.dual_prep, f"images[{i}]") for i, img in enumerate(req.images)]
                vectors = await asyncio.gather(*(server.batchers["image"].submit(t) for t in tensors))
                out["image"] = [np.round(v, 6).tolist() for v in vectors]
            return JSONResponse(out)

        @app.post("/classify", summary="zero-shot: the probability of each label for an image",
                  openapi_extra=_body_doc(ClassifyRequest), **json_only(ClassifyResponse))
        async def classify(request: Request):
            server.need("text")
            req = await parse_body(request, ClassifyRequest)
            image = await server.batchers["image"].submit(await server.tensor(req.image, server.dual_prep))
            labels = await asyncio.gather(*(server.batchers["text"].submit(t) for t in req.labels))
            logits = server.logit_scale * (np.stack(labels) @ image)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            order = np.argsort(-probs)
            return JSONResponse({"label": req.labels[int(order[0])],
                                 "probabilities": {req.labels[int(i)]: round(float(probs[i]), 6) for i in order}})

    # ------------------------------------------------------------------ applications
    if c.caption:
        CaptionRequest = models["CaptionRequest"]

        @app.post("/caption", summary="a caption for an image", openapi_extra=_body_doc(CaptionRequest),
                  **json_only(CaptionResponse))
        async def caption(request: Request):
            batcher = server.need("caption")
            req = await parse_body(request, CaptionRequest)
            tensor = await server.tensor(req.image, server.caption_prep)
            return JSONResponse({"caption": await batcher.submit((tensor, req.beam))})

    if c.vqa:
        AnswerRequest = models["AnswerRequest"]

        @app.post("/answer", summary="answer a question about an image", openapi_extra=_body_doc(AnswerRequest),
                  **json_only(AnswerResponse))
        async def answer(request: Request):
            batcher = server.need("answer")
            req = await parse_body(request, AnswerRequest)
            tensor = await server.tensor(req.image, server.vqa_prep)
            text, prob = await batcher.submit((tensor, req.question))
            return JSONResponse({"answer": text, "probability": round(float(prob), 6)})

    if c.match:
        MatchRequest = models["MatchRequest"]

        @app.post("/match", summary="the probability that a text describes an image",
                  openapi_extra=_body_doc(MatchRequest), **json_only(MatchResponse))
        async def match(request: Request):
            batcher = server.need("match")
            req = await parse_body(request, MatchRequest)
            tensor = await server.tensor(req.image, server.match_prep)
            return JSONResponse({"probability": round(float(await batcher.submit((tensor, req.text))), 6)})

    if c.generate:
        GenerateRequest = models["GenerateRequest"]

        @app.post("/generate", summary="an image drawn from a text (PNG)", openapi_extra=_body_doc(GenerateRequest),
                  response_class=Response,
                  responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "the PNG"}})
        async def generate(request: Request):
            batcher = server.need("generate")
            req = await parse_body(request, GenerateRequest)
            png = await batcher.submit({"text": req.text, "seed": req.seed, "steps": req.steps,
                                        "guidance": req.guidance})
            return Response(png, media_type="image/png")

    # ------------------------------------------------------------------ status
    @app.get("/health", summary="liveness: the process answers")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="readiness: models and index loaded (503 until then)",
             responses={503: {"model": ErrorResponse, "description": "still loading, or loading failed"}})
    async def ready():
        if not server.ready.is_set():
            message = f"loading failed: {server.load_error}" if server.load_error else "loading models and index"
            return JSONResponse({"ready": False, "error": message, "status": 503}, 503)
        return {"ready": True, "features": server.features()}

    @app.get("/meta", summary="what this server holds: models, index, limits")
    async def meta():
        manifest = server.index.manifest if server.index is not None else None
        return {
            "ready": server.ready.is_set(), "features": server.features(),
            "model": None if manifest is None else {k: manifest["model"][k] for k in
                                                    ("fingerprint", "class", "embed_dim", "image_tower")},
            "index": None if manifest is None else {
                "counts": manifest["counts"], "created": manifest["created"], "updated": manifest["updated"],
                "indexes": {m: {"type": i["type"], "count": i["count"], "search": i.get("search", {})}
                            for m, i in manifest["indexes"].items()}},
            "limits": dataclasses.asdict(server.limits),
            "batching": {"max_batch": c.max_batch, "max_wait_ms": c.max_wait_ms},
        }

    @app.get("/metrics", summary="Prometheus metrics: requests, latency, batch sizes", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ the page
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    routes = [r for r in app.routes if hasattr(r, "matches")]

    def route_of(scope) -> str:
        for r in routes:
            matched, _ = r.matches(scope)
            if matched == Match.FULL:
                return getattr(r, "path", "other") or "other"
        return "other"

    def observe(route: str, status: int, seconds: float) -> None:
        server.metrics.observe(route, status, seconds)

    wrapped = LimitsMiddleware(app, config.limits, route_of, observe)
    wrapped.state = app.state  # so tests reach the server through the wrapped app
    wrapped.fastapi = app
    return wrapped


def check_config(config: ServeConfig) -> None:
    """What can be checked before the server starts: paths exist, the index is readable, its model matches
    ``--model``; so a wrong argument is one line and exit 2, not a server that never becomes ready."""
    from vlpt.serve.index import read_manifest

    if config.index is None and config.model is None:
        raise ValueError("give --index (an index folder from `vlpt index`) and/or --model")
    if config.index is not None:
        if not Path(config.index).is_dir():
            raise FileNotFoundError(f"--index {config.index}: no such folder")
        if read_manifest(config.index) is None:
            raise FileNotFoundError(f"--index {config.index}: no index there (no manifest.json); build one with "
                                    f"`vlpt index MODEL SOURCE {config.index}`")
    for flag in ("model", "caption", "vqa", "match", "generate"):
        spec = getattr(config, flag)
        if spec is not None and not Path(spec).exists() and "," not in spec and not spec.startswith("hf-hub:"):
            raise FileNotFoundError(f"--{flag} {spec}: no such model or run folder")
    if config.index is not None and config.model is not None:
        check_model_matches(config.index, config.model)
    if not 0 < config.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {config.port}")
    if config.max_batch < 1 or config.max_wait_ms < 0 or config.threads < 1:
        raise ValueError("--max-batch and --threads must be >= 1, --max-wait-ms >= 0")


def check_model_matches(index: Path, model: str) -> None:
    """The query model must be the one the index was built with (its fingerprint), or queries land in
    another embedding space."""
    from vlpt.serve.index import model_fingerprint, read_manifest

    built = read_manifest(index)["model"]
    if model_fingerprint(model) != built["fingerprint"]:
        raise ValueError(f"--model {model} is not the model {index} was built with ({built['path']}); its "
                         f"embeddings would not match the index's: serve with that model, or re-index")


def serve(config: ServeConfig) -> None:
    """Run the server (blocking) with uvicorn on ``config.host:config.port``."""
    import uvicorn

    check_config(config)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the server is reachable from other machines; it has no authentication",
                    config.host)
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                timeout_keep_alive=30, limit_concurrency=None, server_header=False)

