"""Search and serving: ``vlpt index`` (a faiss index of a collection), ``vlpt serve`` (FastAPI + uvicorn: search,
embeddings and every application over HTTP, and a web page) and ``Client`` (the server's Python client).

Importing this package is cheap: faiss, FastAPI and uvicorn are imported by the modules that need them
(``vlpt.serve.index``, ``vlpt.serve.app``), so ``import vlpt`` stays as fast as before.
"""

from vlpt.serve.client import Client, ClientError

__all__ = ["Client", "ClientError"]
