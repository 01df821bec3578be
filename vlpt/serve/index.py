"""``vlpt index``: embed a collection with a model and write faiss indexes, metadata and a manifest.

Layout of an index folder ``OUT``::

    manifest.json            model identity + preprocessing, dim, metric, sources, counts, failures, index params
    image-<N>.faiss          the image index (N vectors); text-<M>.faiss the text index, when there are texts
    image.<c>.npy / .parquet vectors (float32, L2-normalised) and metadata of chunk c (one chunk per source)
    text.<c>.npy / .parquet
    parts/<source>/part-*.npz  embedded parts of a source not yet merged (kept only until the merge)

Ids are positions: image id ``i`` is row ``i`` of the image chunks taken in order, and vector ``i`` of the
faiss index; text ids likewise. Work is split into parts (``part_size`` images of a folder, one shard, or
``part_size`` lines of a text file); a part is written once, atomically, with a fingerprint of the files it
was computed from and the model, so a re-run (or a restarted torchrun rank) skips finished parts. Under
torchrun each rank embeds parts ``rank, rank + world_size, ...`` and rank 0 merges them: the ids and vectors
do not depend on the number of processes.

The manifest is written last and names the files in use, so a crash leaves the previous index in place.
``add`` (``vlpt index --add``) embeds a new source and adds its vectors to the existing faiss index (no
retraining; the new chunk files are written beside the old ones).
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import copy
import datetime
import hashlib
import itertools
import json
import logging
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlpt.io import ImageLoadError, atomic_write, atomic_write_text
from vlpt.models.image_towers import fold_batch_norms
from vlpt.serve.sources import Preprocessing, Source, chunks, decode_file, open_source, shard_items
from vlpt.train.distributed import DistributedEnv, barrier, is_main

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it loads, at INFO

FORMAT = "vlpt-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
MODALITIES = ("image", "text")
INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")
FLAT_MAX = 20_000  # auto: exact search up to this many vectors ...
HNSW_MAX = 500_000  # ... a graph (HNSW) up to this many, IVF-PQ above
HNSW_M = 32  # graph neighbours per node
HNSW_EF_CONSTRUCTION = 80
# candidates re-ranked with exact-ish (8-bit) vectors, per result asked: tightly clustered embeddings (many
# near-identical images) need a long list, as 4-bit codes cannot order what lies that close
IVF_K_FACTORS = (8, 16, 32, 64, 128, 256)
TIE_TOLERANCE = 1e-3  # recall: a result this close to the k-th exact neighbour's similarity counts (ann-benchmarks)
TUNE_QUERIES = 500
METRIC = "inner_product"  # on L2-normalised vectors: cosine similarity
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class IndexOptions:
    index_type: str = "auto"  # auto | flat | hnsw | ivfpq
    part_size: int = 1024  # images (or text lines) per part of work; a shard is one part
    batch_size: int = 256  # images per model forward (on a CPU at most CPU_RUN, one worker's run)
    workers: int = 0  # threads that decode (and on a CPU embed) images; 0: as many as torch's threads
    dedup: float | None = None  # drop images (texts, for a text source) this similar to one kept before
    target_recall: float = 0.95  # hnsw / ivfpq: search settings tuned to reach this recall@10 vs exact
    nlist: int | None = None  # ivfpq: inverted lists (default ~2 sqrt(N))
    train_size: int | None = None  # ivfpq: vectors the quantizers are trained on (default 39 x nlist)
    keep_parts: bool = False  # keep parts/ after the merge
    seed: int = 0
    precision: str = "auto"  # image forward: auto (bf16 where the CPU computes it natively, else fp32) | fp32 | bf16

    def __post_init__(self):
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {self.index_type!r}")
        for name in ("part_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: as many as torch's threads), got {self.workers}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.dedup is not None and not 0 < self.dedup <= 1:
            raise ValueError(f"the near-duplicate threshold is a cosine similarity in (0, 1], got {self.dedup}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target recall must be in (0, 1], got {self.target_recall}")


# ----------------------------------------------------------------------------- model identity

def model_fingerprint(spec: str | Path) -> str:
    """A sha256 over the model's files (config, weights, tokenizer): the same files, the same embeddings."""
    from vlpt.interop import foreign_format
    from vlpt.models.dual_encoder import find_model_dir

    text = str(spec)
    if foreign_format(text) is None:
        files_at = find_model_dir(text)
    elif "," in text and Path(text.split(",", 1)[1]).is_file():
        files_at = Path(text.split(",", 1)[1])
    else:
        files_at = Path(text)
    h = hashlib.sha256()
    if files_at.is_dir():
        for path in sorted(p for p in files_at.rglob("*") if p.is_file() and p.name != "README.md"):
            h.update(path.relative_to(files_at).as_posix().encode() + b"\0")
            _hash_file(h, path)
    elif files_at.is_file():
        _hash_file(h, files_at)
    else:
        h.update(text.encode())
    return h.hexdigest()


def model_identity(spec: str | Path, model) -> dict:
    """The model's path, fingerprint (``model_fingerprint``), and the preprocessing and dimension its
    embeddings depend on. A server checks its model against this before answering queries."""
    text = str(spec)
    image = model.config.image
    return {"path": str(Path(text).resolve()) if Path(text).exists() else text, "fingerprint": model_fingerprint(spec),
            "class": type(model).__name__, "embed_dim": int(model.config.embed_dim),
            "image_tower": image.name, "context_length": int(model.config.text.context_length),
            "preprocessing": {"image_size": image.image_size, "resize_mode": image.resize_mode,
                              "resize_size": image.resize_size, "interpolation": image.interpolation,
                              "mean": list(image.mean), "std": list(image.std)}}


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


# ----------------------------------------------------------------------------- parts

@dataclass
class Part:
    """One part's embeddings: ``images`` rows of metadata with ``image_vectors`` (n, D); ``texts`` rows
    (caption, image: index into ``images`` or -1, row) with ``text_vectors`` (m, D); ``failures``."""
    fingerprint: str
    images: list[dict]
    image_vectors: np.ndarray
    texts: list[dict]
    text_vectors: np.ndarray
    failures: list[dict]

    def save(self, path: Path) -> None:
        meta = json.dumps({"fingerprint": self.fingerprint, "images": self.images, "texts": self.texts,
                           "failures": self.failures})

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, image_vectors=self.image_vectors, text_vectors=self.text_vectors, meta=np.array(meta))
        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> Part:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            return cls(meta["fingerprint"], meta["images"], data["image_vectors"], meta["texts"],
                       data["text_vectors"], meta["failures"])

    @staticmethod
    def fingerprint_of(path: Path) -> str | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                return json.loads(str(data["meta"]))["fingerprint"]
        except (OSError, ValueError, KeyError, EOFError):
            return None  # unreadable (e.g. cut short): computed again


def part_path(out: Path, source: Source, i: int) -> Path:
    return out / PARTS_DIR / source.key / f"part-{i:06d}.npz"


def _ordered_map(pool: futures.Executor, fn: Callable, items: Sequence, ahead: int) -> Iterator:
    """``fn(item)`` for each item, in order, computed by ``pool`` at most ``ahead`` items in advance."""
    pending: deque = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            break
    for item in it:
        yield pending.popleft().result()
        pending.append(pool.submit(fn, item))
    while pending:
        yield pending.popleft().result()


def _batched(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size`` (the last may be shorter)."""
    items = iter(items)
    return iter(lambda: list(itertools.islice(items, size)), [])


def _try_decode(decode: Callable, *args):
    try:
        return decode(*args), None
    except (ImageLoadError, OSError) as err:
        return None, " ".join(str(err).split())


def channels_last(model):
    """``model`` with channels-last weights: a convolutional image tower then runs on oneDNN's channels-last
    kernels, about 1.5x faster on a CPU, since the uint8 (B, H, W, 3) batches it gets are channels-last already.
    The embeddings do not change (a transformer's weights are not 4-d: nothing moves)."""
    return model.to(memory_format=torch.channels_last)


def inference_ready(model, in_place: bool = False):
    """``model`` as the index and the server run it: channels-last (``channels_last``) and its image tower's batch
    norms folded into the convolutions before them (``fold_batch_norms``; vectors equal to ~1e-7). Folding
    changes the model, so it works on a copy unless ``in_place``; a tower without batch norms is not copied."""
    has_norms = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.image_tower.backbone.modules())
    if has_norms and not model.image_tower.training:
        model = model if in_place else copy.deepcopy(model)
        fold_batch_norms(model.image_tower.backbone)
    return channels_last(model)


def image_precision(requested: str, model) -> str:
    """``auto``: bf16 on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX), where the image forward runs
    about 1.6x faster and the vectors keep a cosine of 0.9999+ to fp32's; fp32 elsewhere."""
    if requested != "auto":
        return requested
    cpu = next(model.parameters()).device.type == "cpu"
    native = any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))
    return "bf16" if cpu and native else "fp32"


DECODE_RUN = 16  # images per decoding task (a future per image costs main-thread time)
CPU_RUN = 32  # images per task on a CPU, decoded and embedded by one worker


def single_threaded_pool(workers: int, name: str) -> futures.ThreadPoolExecutor:
    """``workers`` threads whose torch operations each run on one intra-op thread. The process's own setting is
    put back once they have started (``torch.set_num_threads`` also changes the default of threads that start
    later), so only these threads are affected."""
    threads = torch.get_num_threads()
    started = threading.Barrier(workers + 1)

    def one_thread():
        # torch sets a thread's intra-op threads from the process default on the thread's first use; used here
        # first, so that the setting below is not replaced by the default put back after the barrier
        torch.get_num_threads()
        torch.set_num_threads(1)
        started.wait()

    pool = futures.ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=one_thread)
    for _ in range(workers):  # each waits in the barrier, so every submit starts a new thread
        pool.submit(lambda: None)
    started.wait()
    torch.set_num_threads(threads)
    return pool


class Embedder:
    """Images and texts -> L2-normalised float32 vectors.

    On a CPU, each of ``workers`` threads (default: torch's thread count) decodes a run of images and embeds it
    on one intra-op thread: the cores never wait for one another, where decoding a batch on threads and then
    embedding it on all cores left them idle while Python held its lock (decoding beside a multi-threaded
    forward was slower still: its threads wait for a preempted peer); with ``parts`` about 1.2x the images per
    second on 2 cores. With the model on an accelerator, threads decode the next batches while it runs."""

    def __init__(self, model, options: IndexOptions, progress=None):
        self.model, self.options, self.progress = inference_ready(model), options, progress
        self.precision = image_precision(options.precision, model)
        self.device_type = next(model.parameters()).device.type
        self.decode_ahead = self.device_type != "cpu"
        self.prep = Preprocessing.of(model)
        self.workers = options.workers or torch.get_num_threads()
        self.pool = (futures.ThreadPoolExecutor(self.workers, thread_name_prefix="vlpt-decode") if self.decode_ahead
                     else single_threaded_pool(self.workers, "vlpt-embed"))
        self.dim = int(model.config.embed_dim)
        self.cpu_run = min(options.batch_size, CPU_RUN)  # images a CPU worker decodes and embeds per task

    def close(self) -> None:
        self.pool.shutdown()

    @torch.inference_mode()
    def images(self, tensors: list[torch.Tensor]) -> np.ndarray:
        if not tensors:
            return np.zeros((0, self.dim), np.float32)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.model.encode_image(torch.stack(tensors)).float().numpy()  # (B, D)
        out /= np.linalg.norm(out, axis=1, keepdims=True)  # normalised again in fp32 (bf16 keeps 3 digits)
        return out

    def texts(self, texts: list[str]) -> np.ndarray:
        from vlpt.evaluate.scoring import embed_texts

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if self.model.tokenizer is None:
            raise ValueError("this model has no tokenizer, so its texts cannot be embedded")
        return embed_texts(self.model, texts, self.options.batch_size).numpy()

    def embed(self, decoded: list[tuple[object, torch.Tensor | None]]) -> tuple[list, np.ndarray]:
        """(items, vectors) of the (item, tensor) pairs whose tensor is not None (None: could not be decoded)."""
        kept = [(item, tensor) for item, tensor in decoded if tensor is not None]
        return [item for item, _ in kept], self.images([tensor for _, tensor in kept])

    def _count(self, n: int) -> None:
        if self.progress is not None:
            self.progress.update(n)

    def _embedded(self, decoded: Iterable[tuple[object, torch.Tensor | None]]) -> Iterator[tuple[list, np.ndarray]]:
        """(items, vectors) per run of (item, tensor) pairs, in order; a model batch on an accelerator, a CPU run
        embedded by the worker threads on a CPU. Every pair counts as done, decoded or not."""
        runs = _batched(decoded, self.options.batch_size if self.decode_ahead else self.cpu_run)
        if self.decode_ahead:
            done = ((len(run), self.embed(run)) for run in runs)
        else:
            done = _ordered_map(self.pool, lambda run: (len(run), self.embed(run)), runs, 2 * self.workers)
        for n, result in done:
            self._count(n)
            yield result

    def _decode_folder_run(self, run: Sequence) -> list[tuple[object, torch.Tensor | None, str | None]]:
        return [(item, *_try_decode(decode_file, item.path, self.prep)) for item in run]

    def _embed_decoded(self, triples: list[tuple[object, torch.Tensor | None, str | None]]
                       ) -> tuple[list, np.ndarray, list]:
        """(items, vectors, [(item, problem)]) of decoded (item, tensor, problem) triples."""
        return (*self.embed([(item, tensor) for item, tensor, _ in triples]),
                [(item, problem) for item, _, problem in triples if problem])

    def _decode_and_embed(self, run: Sequence) -> tuple[list, np.ndarray, list]:
        """A CPU worker's task: ``_embed_decoded`` of a run of a folder's items."""
        return self._embed_decoded(self._decode_folder_run(run))

    def _decoded_ahead(self, items: Sequence) -> Iterator[tuple[list, np.ndarray, list]]:
        """``_embed_decoded`` per model batch of a folder's items on an accelerator: threads decode the next
        batches while it runs."""
        ahead = 2 * max(1, self.options.batch_size // DECODE_RUN)
        decoded = (triple for run in _ordered_map(self.pool, self._decode_folder_run, chunks(items, DECODE_RUN), ahead)
                   for triple in run)
        return map(self._embed_decoded, _batched(decoded, self.options.batch_size))

    def parts(self, source: Source, todo: Sequence[tuple[int, str]]) -> Iterator[Part]:
        """The parts ``todo`` ((part index, fingerprint) pairs) of ``source``, embedded, in order. On a CPU the
        runs of a folder's parts flow through the workers without a pause between parts (waiting for each part
        to finish, be saved and the next be listed left the cores idle ~8% of the time)."""
        if source.kind != "folder":
            for i, fingerprint in todo:
                yield self._part(source, i, fingerprint)
        elif self.decode_ahead:
            for i, fingerprint in todo:
                yield self._folder_part(fingerprint, self._decoded_ahead(source.parts[i]))
        else:
            runs = [chunks(source.parts[i], self.cpu_run) for i, _ in todo]
            results = _ordered_map(self.pool, self._decode_and_embed, [r for part in runs for r in part],
                                   2 * self.workers)
            for (_, fingerprint), part_runs in zip(todo, runs):
                yield self._folder_part(fingerprint, itertools.islice(results, len(part_runs)))

    def _part(self, source: Source, i: int, fingerprint: str) -> Part:
        """Part ``i`` of a shards or text source, embedded."""
        images, vectors, failures, texts = [], [], [], []
        if source.kind == "shards":
            shard = Path(source.parts[i])
            names = source.class_names

            def decoded():  # the tar is read in order here; the model runs on the workers (CPU)
                for s in shard_items(shard, self.prep):
                    if s.failure:
                        failures.append({"where": f"{shard.name}:{s.key}", "reason": s.failure})
                    yield s, s.image
            for items, vecs in self._embedded(decoded()):
                vectors.append(vecs)
                images += [{"path": shard.name, "key": s.key, "member": s.member, "row": s.row,
                            "captions": s.captions,
                            "label": None if s.label < 0 else (names[s.label] if names and s.label < len(names)
                                                               else str(s.label))} for s in items]
        else:
            texts = [{"caption": t, "image": -1, "row": line} for line, t in source.parts[i]]
            self._count(len(texts))
        return self._assemble(fingerprint, images, vectors, failures, texts)

    def _folder_part(self, fingerprint: str, results: Iterable[tuple[list, np.ndarray, list]]) -> Part:
        """A folder part from its runs' (items, vectors, [(item, problem)]); every item counts as done."""
        images, vectors, failures = [], [], []
        for items, vecs, problems in results:
            self._count(len(items) + len(problems))
            failures += [{"where": item.ref, "reason": problem} for item, problem in problems]
            vectors.append(vecs)
            images += [{"path": it.ref, "key": None, "member": None, "row": it.row, "captions": it.captions,
                        "label": it.label} for it in items]
        return self._assemble(fingerprint, images, vectors, failures, [])

    def _assemble(self, fingerprint: str, images: list[dict], vectors: list[np.ndarray], failures: list[dict],
                  texts: list[dict]) -> Part:
        """The part, with its images' captions (and a text source's lines) embedded."""
        for index, row in enumerate(images):
            texts += [{"caption": c, "image": index, "row": row["row"]} for c in row["captions"]]
        image_vectors = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        text_vectors = self.texts([t["caption"] for t in texts])
        return Part(fingerprint, images, image_vectors.astype(np.float32), texts, text_vectors.astype(np.float32),
                    failures)


# ----------------------------------------------------------------------------- faiss

def choose_index_type(n: int, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "flat" if n <= FLAT_MAX else "hnsw" if n <= HNSW_MAX else "ivfpq"


def default_nlist(n: int) -> int:
    """Inverted lists for IVF: a power of two near 2 sqrt(N), with >= 39 training points per list."""
    target = max(16, min(65536, int(2 * np.sqrt(n)), n // 39))
    return 1 << max(0, int(round(np.log2(max(1, target)))))


def pq_subquantizers(dim: int) -> int:
    """PQ sub-vectors: 2 dimensions each (4-bit fast-scan codes; an 8-bit SQ copy re-ranks the candidates)."""
    for m in (dim // 2, dim // 4, dim):
        if m >= 1 and dim % m == 0:
            return m
    return dim


def build_faiss(vectors: np.ndarray, index_type: str, options: IndexOptions | None = None):
    """A faiss index of ``vectors`` (N, D) (L2-normalised; inner product) with its build settings."""
    import faiss

    options = options or IndexOptions()
    n, dim = vectors.shape
    kind = choose_index_type(n, index_type)
    info: dict = {"type": kind}
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        info.update(M=HNSW_M, efConstruction=HNSW_EF_CONSTRUCTION)
    elif kind == "ivfpq":
        if n < 64:
            raise ValueError(f"an IVF-PQ index needs at least 64 vectors to train on, got {n}; use flat")
        nlist = options.nlist or default_nlist(n)
        m = pq_subquantizers(dim)
        spec = f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)"
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        train_n = min(n, options.train_size or max(39 * nlist, 10_000))
        rng = np.random.default_rng(options.seed)
        sample = vectors[np.sort(rng.choice(n, train_n, replace=False))] if train_n < n else vectors
        index.train(np.ascontiguousarray(sample, np.float32))
        info.update(factory=spec, nlist=nlist, pq_m=m, trained_on=int(train_n))
    else:
        raise ValueError(f"unknown index type {kind!r}")
    for start in range(0, n, 65536):
        index.add(np.ascontiguousarray(vectors[start:start + 65536], np.float32))
    return index, info


def apply_search_params(index, params: dict) -> None:
    import faiss

    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["efSearch"])
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "k_factor" in params:
        faiss.downcast_index(index).k_factor = float(params["k_factor"])


def recall_at(index, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int,
              exclude: np.ndarray | None = None, tolerance: float = TIE_TOLERANCE) -> float:
    """Mean recall@k of ``index`` against exact neighbours ``truth``: the share of the k results whose exact
    similarity to the query reaches the k-th exact neighbour's, less ``tolerance``. This is ann-benchmarks'
    definition: among near-duplicates (embeddings of near-identical images, repeated captions) which of several
    equally near items comes back is not a miss. ``exclude[i]`` (the query's own id) is left out of both lists,
    so a query that is in the collection does not count itself."""
    extra = 0 if exclude is None else 1
    _, found = index.search(np.ascontiguousarray(queries, np.float32), k + extra)
    hits = 0.0
    for i, query in enumerate(queries):
        want = [t for t in truth[i] if t >= 0 and (exclude is None or t != exclude[i])][:k]
        got = [f for f in found[i] if f >= 0 and (exclude is None or f != exclude[i])][:k]
        if not want:
            continue
        threshold = float(np.asarray(vectors[want[-1]], np.float32) @ query) - tolerance
        sims = np.asarray(vectors[np.sort(np.asarray(got, np.int64))], np.float32) @ query if got else np.zeros(0)
        hits += min(len(want), int(np.sum(sims >= threshold))) / len(want)
    return hits / len(queries)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss

    _, ids = faiss.knn(np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(vectors, np.float32), k,
                       metric=faiss.METRIC_INNER_PRODUCT)
    return ids


def tune_search(index, info: dict, vectors: np.ndarray, target: float, k: int = 10, seed: int = 0,
                other: np.ndarray | None = None) -> dict:
    """The cheapest search setting whose recall@k against exact search reaches ``target`` for each kind of query
    tried: a sample of the collection's own vectors (each query's own id left out) and, when given, a sample of
    ``other`` (the other modality's vectors: an image index is searched by text); the largest tried otherwise."""
    kind = info["type"]
    if kind == "flat":
        return {"recall_at_10": 1.0}
    n = len(vectors)
    rng = np.random.default_rng(seed)
    qids = np.sort(rng.choice(n, min(TUNE_QUERIES, n), replace=False))
    sets = [(np.ascontiguousarray(vectors[qids], np.float32), qids, k + 1)]
    if other is not None and len(other):
        picked = np.sort(rng.choice(len(other), min(TUNE_QUERIES, len(other)), replace=False))
        sets.append((np.ascontiguousarray(other[picked], np.float32), None, k))
    sets = [(q, ex, exact_neighbours(vectors, q, kk)) for q, ex, kk in sets]
    if kind == "hnsw":
        ladder = [{"efSearch": ef} for ef in (16, 32, 64, 128, 256, 512, 1024)]
    else:
        probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p <= info["nlist"]]
        # cheapest first, by a rough cost: codes scanned (nprobe lists of n / nlist) + candidates re-ranked
        # (one costs about as much as 16 scanned 4-bit codes)
        cost = lambda p, kf: p * n / info["nlist"] + 16 * kf * k  # noqa: E731
        ladder = [{"nprobe": p, "k_factor": kf} for p, kf in
                  sorted(((p, kf) for kf in IVF_K_FACTORS for p in probes), key=lambda pk: cost(*pk))]
    best = None
    for params in ladder:
        apply_search_params(index, params)
        recall = min(recall_at(index, vectors, q, truth, k, exclude=ex) for q, ex, truth in sets)
        best = {**params, "recall_at_10": round(recall, 4)}
        if recall >= target:
            break
    if best["recall_at_10"] < target:
        log.warning("the %s index reaches recall@%d %.3f at its largest setting tried (%s), under the target %.2f",
                    kind, k, best["recall_at_10"], best, target)
    apply_search_params(index, best)
    tried = f"{len(qids)} of the collection's vectors" + (f" and {len(sets[1][0])} of the other modality's"
                                                           if len(sets) > 1 else "")
    return {**best, "tuned_on": f"{tried} as queries (the lower recall), target {target}, "
                                f"tie tolerance {TIE_TOLERANCE}"}


def near_duplicates(vectors: np.ndarray, threshold: float, existing: np.ndarray | None = None,
                    block: int = 1024) -> np.ndarray:
    """For each row of ``vectors`` (in order), -1 if it is kept, else the id of an earlier kept vector whose
    cosine similarity with it is >= ``threshold`` (``existing`` vectors are ids 0..E-1, all kept; new ones
    follow them)."""
    import faiss

    n, dim = vectors.shape
    offset = 0 if existing is None else len(existing)
    kept_index = faiss.IndexFlatIP(dim)
    kept_ids: list[int] = []
    if existing is not None and len(existing):
        kept_index.add(np.ascontiguousarray(existing, np.float32))
        kept_ids = list(range(offset))
    dup_of = np.full(n, -1, np.int64)
    for start in range(0, n, block):
        chunk = np.ascontiguousarray(vectors[start:start + block], np.float32)
        if kept_index.ntotal:
            sims, found = kept_index.search(chunk, 1)
            for r in np.nonzero(sims[:, 0] >= threshold)[0]:
                dup_of[start + r] = kept_ids[found[r, 0]]
        within = chunk @ chunk.T  # (b, b)
        kept_here: list[int] = []
        for r in range(len(chunk)):
            if dup_of[start + r] >= 0:
                continue
            if kept_here:
                sims = within[r, kept_here]
                j = int(np.argmax(sims))
                if sims[j] >= threshold:
                    dup_of[start + r] = offset + start + kept_here[j]
                    continue
            kept_here.append(r)
        kept_index.add(chunk[kept_here])
        kept_ids += [offset + start + r for r in kept_here]
    # ids above were positions among all rows; map them to ids among kept rows
    new_id = np.cumsum(dup_of < 0) - 1 + offset
    mapped = dup_of.copy()
    for r in np.nonzero(dup_of >= offset)[0]:
        mapped[r] = new_id[dup_of[r] - offset]
    return mapped


# ----------------------------------------------------------------------------- the manifest

def read_manifest(out: str | Path) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable index manifest ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a vlpt index manifest (format {FORMAT!r})")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: index format version {data.get('version')}, this vlpt reads {FORMAT_VERSION}")
    return data


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- building

@dataclass
class IndexResult:
    out: Path
    manifest: dict | None  # None on torchrun ranks other than 0
    computed_parts: int
    reused_parts: int
    up_to_date: bool = False


def build_index(model_spec: str | Path, source_spec: str | Path, out: str | Path, options: IndexOptions | None = None,
                *, add: bool = False, overwrite: bool = False, env: DistributedEnv | None = None,
                progress: bool = True, model=None) -> IndexResult:
    """Embed ``source_spec`` with the model at ``model_spec`` into the index folder ``out`` (see the module
    docstring). ``add``: add the source to an existing index. ``overwrite``: replace an index of another
    source. ``env``: this process's rank (torchrun); rank 0 merges. ``model``: the loaded model, if at hand."""
    from tqdm import tqdm

    from vlpt.factory import load_dual_encoder

    options = options or IndexOptions()
    env = env or DistributedEnv()
    out = Path(out)
    source = open_source(source_spec, options.part_size)
    manifest = read_manifest(out)
    if model is None:
        model = load_dual_encoder(model_spec)
    model.eval()
    identity = model_identity(model_spec, model)
    if source.kind == "text" and model.tokenizer is None:
        raise ValueError(f"{model_spec} has no tokenizer, so a text source cannot be indexed with it")
    if manifest is not None:
        done = [s for s in manifest["sources"] if s["key"] == source.key]
        if add or done:
            if manifest["model"]["fingerprint"] != identity["fingerprint"]:
                raise ValueError(f"{out} was built with the model {manifest['model']['path']} (another fingerprint); "
                                 f"vectors of {model_spec} would live in another space: index into a new folder")
        if done and done[0]["fingerprint"] == _source_fingerprint(source):
            log.info("%s already holds %s, unchanged; nothing to do", out, source.location)
            return IndexResult(out, manifest if is_main(env) else None, 0, len(source.parts), up_to_date=True)
        if done:
            raise FileExistsError(f"{out} already holds {source.location}, which has changed since; index it into "
                                  f"a new folder or pass --overwrite to rebuild {out}")
        if not add and not overwrite:
            held = ", ".join(s["location"] for s in manifest["sources"])
            raise FileExistsError(f"{out} already holds an index (of {held}); pass --add to add {source.location} "
                                  f"to it, or --overwrite to replace it")
    elif add:
        log.info("%s holds no index yet: --add starts one", out)
    if overwrite and not add and manifest is not None and is_main(env):
        _remove_index_files(out, manifest)
        manifest = None
    barrier(env)

    mine = [i for i in range(len(source.parts)) if i % env.world_size == env.rank]
    total = sum(source.sizes[i] for i in mine)
    unit = "text" if source.kind == "text" else "img"
    bar = tqdm(total=total, unit=unit, unit_scale=True, disable=not progress or not is_main(env),
               desc=f"embedding{f' (rank 0 of {env.world_size})' if env.world_size > 1 else ''}", dynamic_ncols=True)
    embedder = Embedder(model, options, bar)
    todo = []
    try:
        for i in mine:
            fingerprint = hashlib.sha256(
                f"{source.part_fingerprint(i)}:{identity['fingerprint']}:{embedder.precision}:{FORMAT_VERSION}"
                .encode()).hexdigest()
            path = part_path(out, source, i)
            if path.is_file() and Part.fingerprint_of(path) == fingerprint:
                bar.update(source.sizes[i])
            else:
                todo.append((i, fingerprint))
        for (i, _), part in zip(todo, embedder.parts(source, todo)):
            part.save(part_path(out, source, i))
    finally:
        embedder.close()
        bar.close()
    barrier(env)
    if not is_main(env):
        return IndexResult(out, None, len(todo), len(mine) - len(todo))
    manifest = _merge(out, source, identity, manifest, options, embedder.precision)
    if not options.keep_parts:
        shutil.rmtree(out / PARTS_DIR / source.key, ignore_errors=True)
        with contextlib.suppress(OSError):
            (out / PARTS_DIR).rmdir()  # only when empty
    return IndexResult(out, manifest, len(todo), len(mine) - len(todo))


def _source_fingerprint(source: Source) -> str:
    h = hashlib.sha256()
    for i in range(len(source.parts)):
        h.update(source.part_fingerprint(i).encode())
    return h.hexdigest()


def _remove_index_files(out: Path, manifest: dict) -> None:
    for info in manifest.get("indexes", {}).values():
        for name in [info["file"]] + [c[k] for c in info["chunks"] for k in ("vectors", "metadata")]:
            (out / name).unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)


def _merge(out: Path, source: Source, identity: dict, manifest: dict | None, options: IndexOptions,
           precision: str) -> dict:
    """Rank 0: the source's parts -> new chunk files, the faiss indexes built (or added to), the manifest."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [Part.load(part_path(out, source, i)) for i in range(len(source.parts))]
    dim = identity["embed_dim"]
    failures = [f.as_dict() for f in source.failures] + [f for p in parts for f in p.failures]
    images = [row for p in parts for row in p.images]
    image_vectors = np.concatenate([p.image_vectors for p in parts]) if parts else np.zeros((0, dim), np.float32)
    texts, text_vectors = [], []
    for p, first in zip(parts, np.cumsum([0] + [len(p.images) for p in parts[:-1]])):
        texts += [{**t, "image": -1 if t["image"] < 0 else int(first) + t["image"]} for t in p.texts]
        text_vectors.append(p.text_vectors)
    text_vectors = np.concatenate(text_vectors) if text_vectors else np.zeros((0, dim), np.float32)

    old = manifest or {}
    indexes = {m: dict(info) for m, info in old.get("indexes", {}).items()}
    counts_before = {m: indexes[m]["count"] if m in indexes else 0 for m in MODALITIES}
    source_id = len(old.get("sources", []))
    duplicates: list[dict] = []
    image_ids = np.arange(len(images)) + counts_before["image"]
    if options.dedup is not None and len(images):
        existing = _read_vectors(out, indexes["image"]) if "image" in indexes else None
        dup_of = near_duplicates(image_vectors, options.dedup, existing)
        keep = dup_of < 0
        new_id = np.cumsum(keep) - 1 + counts_before["image"]
        image_ids = np.where(keep, new_id, dup_of)  # a dropped image's captions point at the image it duplicates
        duplicates = [{"where": item_where(images[r]), "duplicate_of": int(dup_of[r])} for r in np.nonzero(~keep)[0]]
        images = [row for row, k in zip(images, keep) if k]
        image_vectors = image_vectors[keep]
    elif options.dedup is not None and len(texts) and source.kind == "text":
        existing = _read_vectors(out, indexes["text"]) if "text" in indexes else None
        dup_of = near_duplicates(text_vectors, options.dedup, existing)
        keep = dup_of < 0
        duplicates = [{"where": f"{Path(source.location).name}:{texts[r]['row']}", "duplicate_of": int(dup_of[r])}
                      for r in np.nonzero(~keep)[0]]
        texts = [t for t, k in zip(texts, keep) if k]
        text_vectors = text_vectors[keep]
    for t in texts:
        if t["image"] >= 0:
            t["image"] = int(image_ids[t["image"]])

    chunk = source_id
    new_tables = {}
    if len(images):
        ids = np.arange(len(images), dtype=np.int64) + counts_before["image"]
        new_tables["image"] = (image_vectors, pa.table({
            "id": ids, "source": pa.array([source_id] * len(images), pa.int32()),
            "path": [r["path"] for r in images], "key": pa.array([r["key"] for r in images], pa.string()),
            "member": pa.array([r["member"] for r in images], pa.string()),
            "row": pa.array([r["row"] for r in images], pa.int64()),
            "caption": pa.array([r["captions"][0] if r["captions"] else None for r in images], pa.string()),
            "captions": pa.array([r["captions"] for r in images], pa.list_(pa.string())),
            "label": pa.array([r["label"] for r in images], pa.string())}))
    if len(texts):
        ids = np.arange(len(texts), dtype=np.int64) + counts_before["text"]
        new_tables["text"] = (text_vectors, pa.table({
            "id": ids, "source": pa.array([source_id] * len(texts), pa.int32()),
            "caption": [t["caption"] for t in texts],
            "image_id": pa.array([t["image"] for t in texts], pa.int64()),
            "row": pa.array([t["row"] for t in texts], pa.int64())}))

    for modality, (vectors, table) in new_tables.items():
        vectors = np.ascontiguousarray(vectors, np.float32)
        vec_name, meta_name = f"{modality}.{chunk}.npy", f"{modality}.{chunk}.parquet"
        atomic_write(out / vec_name, lambda tmp, v=vectors: _save_npy(tmp, v))
        atomic_write(out / meta_name, lambda tmp, t=table: pq.write_table(t, tmp))
        info = indexes.get(modality)
        count = counts_before[modality] + len(vectors)
        if info is None:  # a new index: built, trained and tuned on these vectors
            index, build = build_faiss(vectors, options.index_type, options)
            other = [v for m, (v, _) in new_tables.items() if m != modality]  # the queries from the other side
            search = tune_search(index, build, vectors, options.target_recall, seed=options.seed,
                                 other=other[0] if other else None)
            info = {"type": build["type"], "build": build, "search": search, "chunks": []}
        else:  # --add: the trained index takes the new vectors as they are
            index = faiss.read_index(str(out / info["file"]))
            for start in range(0, len(vectors), 65536):
                index.add(vectors[start:start + 65536])
        if index.ntotal != count:
            raise RuntimeError(f"internal error: the {modality} index holds {index.ntotal} vectors, expected {count}")
        name = f"{modality}-{count}.faiss"
        atomic_write(out / name, lambda tmp, ix=index: faiss.write_index(ix, str(tmp)))
        previous = info.get("file")
        info.update(file=name, count=count,
                    chunks=info["chunks"] + [{"source": source_id, "count": len(vectors), "vectors": vec_name,
                                              "metadata": meta_name}])
        info["_replaced"] = previous
        indexes[modality] = info

    entry = {"id": source_id, "key": source.key, "fingerprint": _source_fingerprint(source), **source.describe(),
             "added": _now(), "parts": len(source.parts), "images": len(images), "texts": len(texts),
             "failed": len(failures), "duplicates": len(duplicates),
             "image_precision": precision if len(images) else None}
    replaced = [info.pop("_replaced", None) for info in indexes.values()]
    result = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "created": old.get("created", _now()), "updated": _now(),
        "model": identity, "metric": METRIC, "embed_dim": dim,
        "sources": old.get("sources", []) + [entry],
        "counts": {"images": sum(s["images"] for s in old.get("sources", [])) + len(images),
                   "texts": sum(s["texts"] for s in old.get("sources", [])) + len(texts),
                   "failed": sum(s["failed"] for s in old.get("sources", [])) + len(failures),
                   "duplicates": sum(s["duplicates"] for s in old.get("sources", [])) + len(duplicates)},
        "indexes": indexes,
        "failures": old.get("failures", []) + [{"source": source_id, **f} for f in failures],
        "duplicates": old.get("duplicates", []) + [{"source": source_id, **d} for d in duplicates],
    }
    atomic_write_text(out / MANIFEST, json.dumps(result, indent=1) + "\n")
    for name in replaced:
        if name and all(name != info["file"] for info in indexes.values()):
            (out / name).unlink(missing_ok=True)
    return result


def item_where(row: dict) -> str:
    """An image row's place in its source: its path, or ``shard.tar:KEY`` for a shard sample."""
    return f"{row['path']}:{row['key']}" if row.get("key") else row["path"]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _read_vectors(out: Path, info: dict) -> np.ndarray:
    return np.concatenate([np.load(out / c["vectors"], mmap_mode="r") for c in info["chunks"]])


# ----------------------------------------------------------------------------- reading an index

@dataclass
class Collection:
    """One modality of an index: the faiss index, its vectors (memory-mapped) and its metadata table."""
    modality: str
    index: object
    vectors: list[np.ndarray]  # per chunk, memory-mapped
    offsets: np.ndarray  # first id of each chunk
    table: object  # pyarrow.Table, row i = id i
    info: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def vector(self, item_id: int) -> np.ndarray:
        chunk = int(np.searchsorted(self.offsets, item_id, side="right") - 1)
        return np.asarray(self.vectors[chunk][item_id - self.offsets[chunk]], np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of shape (Q, k); missing results (k > count) have id -1."""
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)

    def rows(self, ids: Sequence[int]) -> list[dict]:
        return self.table.take(np.asarray(ids, np.int64)).to_pylist()


@dataclass
class IndexReader:
    """An index folder opened for search: ``collections["image"]`` / ``["text"]`` and the manifest."""
    root: Path
    manifest: dict
    collections: dict[str, Collection]

    @classmethod
    def open(cls, out: str | Path) -> IndexReader:
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(out)
        manifest = read_manifest(out)
        if manifest is None:
            raise FileNotFoundError(f"no index in {out} (no {MANIFEST}); build one with `vlpt index MODEL SOURCE {out}`")
        collections = {}
        for modality, info in manifest["indexes"].items():
            index = faiss.read_index(str(out / info["file"]))
            apply_search_params(index, info.get("search", {}))
            vectors = [np.load(out / c["vectors"], mmap_mode="r") for c in info["chunks"]]
            table = pa.concat_tables([pq.read_table(out / c["metadata"]) for c in info["chunks"]]).combine_chunks()
            offsets = np.cumsum([0] + [c["count"] for c in info["chunks"][:-1]])
            if table.num_rows != index.ntotal or sum(len(v) for v in vectors) != index.ntotal:
                raise ValueError(f"{out}: the {modality} index holds {index.ntotal} vectors but its chunks "
                                 f"{table.num_rows} rows; rebuild it")
            collections[modality] = Collection(modality, index, vectors, offsets, table, info)
        return cls(out, manifest, collections)

    def source(self, source_id: int) -> dict:
        return self.manifest["sources"][source_id]

    def vectors(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of a modality, in id order (what the torchrun test compares)."""
        c = self.collections[modality]
        return np.arange(c.count), np.concatenate([np.asarray(v) for v in c.vectors])


def summary(manifest: dict) -> str:
    c = manifest["counts"]
    kinds = ", ".join(f"{m}: {i['count']} ({i['type']}"
                      + (f", {', '.join(f'{k} {v}' for k, v in i['search'].items() if k not in ('tuned_on',))}"
                         if i["type"] != "flat" else "") + ")" for m, i in manifest["indexes"].items())
    return (f"{c['images']} images, {c['texts']} texts, {c['failed']} failed, {c['duplicates']} near-duplicates "
            f"removed; indexes: {kinds or 'none'}")


__all__ = ["FORMAT", "INDEX_TYPES", "IndexOptions", "IndexReader", "IndexResult", "build_faiss", "build_index",
           "channels_last", "choose_index_type", "inference_ready", "image_precision", "model_fingerprint", "model_identity", "near_duplicates", "read_manifest", "summary", "tune_search"]
