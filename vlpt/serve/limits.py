"""The server's limits, checked before any parsing: body size, concurrency, time; and request images, refused
from their header (pixels, sides) before a pixel is decoded.

``LimitsMiddleware`` wraps the whole ASGI app (outside FastAPI): a request whose Content-Length is over the
cap gets 413 before its body is read; a body streamed without a length is counted and cut off at the cap; a
request arriving while ``max_concurrency`` are in flight gets 429 at once; one that takes longer than
``request_timeout_s`` gets 503 (its model work is dropped). Every refusal is a JSON ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from PIL import Image

from vlpt.data.files import as_rgb, check_image_size
from vlpt.io import ImageLoadError

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    # the page loads nothing from elsewhere: scripts, styles, images and requests stay on this server
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                                 b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
]
# Answered even when the server is full: probes and scrapes must not be refused for load.
UNLIMITED_PATHS = frozenset({"/health", "/ready", "/metrics"})


@dataclass
class Limits:
    max_body_bytes: int = 8 * 2 ** 20  # request body, checked from Content-Length and while streaming (413)
    max_image_pixels: int = 25_000_000  # width x height declared in an image's header (413)
    max_image_side: int = 10_000  # pixels per side declared in an image's header (413)
    max_text_chars: int = 1000  # characters in a query, caption, question, label or prompt (422)
    max_k: int = 1000  # results per search (422)
    max_texts: int = 256  # texts in one /embed request (422)
    max_images: int = 32  # images in one /embed request (422)
    max_labels: int = 256  # labels in one /classify request (422)
    max_dim: int = 4096  # length of a query embedding (422; it must also equal the index's)
    max_beam: int = 8  # /caption beam width (422)
    max_generate_steps: int = 100  # /generate sampling steps (422)
    request_timeout_s: float = 60.0  # whole request, body included (503)
    max_concurrency: int = 64  # requests in flight; one more gets 429

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"limit {f.name} must be > 0, got {value}")


def parse_limits(overrides: Sequence[str] = ()) -> Limits:
    """``Limits`` with ``NAME=VALUE`` changes (``--limit max_k=100``)."""
    known = {f.name: f.type for f in fields(Limits)}
    values = {}
    for text in overrides:
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ValueError(f"--limit {text!r}: expected NAME=VALUE with NAME one of {', '.join(known)}")
        try:
            values[name] = float(value) if known[name] in ("float", float) else int(value)
        except ValueError:
            raise ValueError(f"--limit {name}: {value!r} is not a number") from None
    return Limits(**values)


class RequestError(Exception):
    """A request refused with ``status`` and a message (turned into a JSON error)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BodyTooLarge(RequestError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit:,} bytes (max_body_bytes)")


def json_error(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


async def send_json_error(send, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json_error(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *SECURITY_HEADERS, *headers]})
    await send({"type": "http.response.body", "body": body})


class LimitsMiddleware:
    """Pure ASGI (no per-request task or body copy): limits, security headers, and ``observe(route, status,
    seconds)`` for the metrics. ``route_of(scope)`` names the route (a template, not the raw path)."""

    def __init__(self, app, limits: Limits, route_of: Callable[[dict], str],
                 observe: Callable[[str, int, float], None] | None = None):
        self.app, self.limits, self.route_of, self.observe = app, limits, route_of, observe
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        route = self.route_of(scope)
        state = {"status": 0, "received": 0, "body_done": False}
        limit = self.limits.max_body_bytes

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        async def refuse(status: int, message: str, headers=()):
            state["status"] = status
            await send_json_error(send, status, message, headers)

        try:
            length = _content_length(scope)
            if length is not None and length > limit:
                return await refuse(413, BodyTooLarge(limit).message)
            if self.active >= self.limits.max_concurrency and route not in UNLIMITED_PATHS:
                return await refuse(429, f"the server is busy ({self.limits.max_concurrency} requests in flight, "
                                         f"max_concurrency); retry shortly", [(b"retry-after", b"1")])
        except RequestError as err:
            return await refuse(err.status, err.message)

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    raise BodyTooLarge(limit)
                if not message.get("more_body", False):
                    state["body_done"] = True
            return message

        self.active += 1
        try:
            await asyncio.wait_for(self.app(scope, receive_limited, send_tracked), self.limits.request_timeout_s)
        except BodyTooLarge as err:
            if not state["status"]:
                await refuse(413, err.message)
        except (asyncio.TimeoutError, TimeoutError):
            if not state["status"]:
                if state["body_done"] or scope.get("method") in ("GET", "HEAD"):
                    await refuse(503, f"the request took over {self.limits.request_timeout_s:g} s "
                                      f"(request_timeout_s); the server may be overloaded", [(b"retry-after", b"1")])
                else:
                    await refuse(408, f"the request body did not arrive within {self.limits.request_timeout_s:g} s "
                                      f"(request_timeout_s)")
        finally:
            self.active -= 1
            if self.observe is not None:
                self.observe(route, state["status"] or 500, time.perf_counter() - start)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            if not value.isdigit():
                raise RequestError(400, "Content-Length is not a whole number")
            return int(value)
    return None


# ----------------------------------------------------------------------------- request images

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def image_bytes(value: str | bytes, what: str = "image") -> bytes:
    """An image field: bytes as they are (multipart), or base64 text, optionally a ``data:...;base64,`` URL."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{what} is not valid base64 (send the file's bytes base64-encoded, or upload it "
                                f"as multipart/form-data)") from None
    if not data:
        raise RequestError(422, f"{what} is empty")
    return data


def open_image(data: bytes, limits: Limits, what: str = "image") -> Image.Image:
    """Bytes -> an RGB PIL image, refused (413) when its header declares more than the limits allow, before any
    pixel is decoded; 422 when it is not an image or its data are corrupt."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))  # PIL: "Image size (N pixels) exceeds limit of ..."
        size = f"{int(pixels[1]):,} pixels" if pixels else "more pixels than PIL allows"
        raise RequestError(413, f"{what} declares {size}, over max_image_pixels ({limits.max_image_pixels:,}): "
                                f"a possible decompression bomb, refused before decoding") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for bytes it cannot identify
        raise RequestError(422, f"{what} is not an image of a format the server reads (PNG, JPEG, WebP, ...)") from None
    width, height = img.size
    problem = check_image_size(width, height, limits.max_image_side, limits.max_image_pixels)
    if problem:
        img.close()
        raise RequestError(413, f"{what}: {problem} (max_image_side / max_image_pixels); refused before decoding")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            return as_rgb(img)
    except Exception as err:  # noqa: BLE001 - truncated data: OSError, SyntaxError, ValueError, ...
        raise RequestError(422, f"{what}: truncated or corrupt image data ({type(err).__name__})") from None
    finally:
        img.close()


__all__ = ["BodyTooLarge", "ImageLoadError", "Limits", "LimitsMiddleware", "RequestError", "image_bytes",
           "open_image", "parse_limits"]
