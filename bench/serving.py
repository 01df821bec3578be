"""Issue 23: search and serving. Writes bench/results/serving.json (--quick: serving-quick.json).

1. Indexing throughput. A folder of 64 px shapes PNGs (no captions file: images only) is embedded with the demo
   model (the tiny-shapes config) twice, side by side: ``vlpt index`` (``build_index``: decoding threads ahead
   of the model, uint8 batches, channels-last weights, a flat faiss index) and the straightforward loop that
   clip-retrieval's inference runs (PIL load -> the model's torchvision preprocessing -> a batch of 256 ->
   ``encode_image`` -> ``faiss.IndexFlatIP.add``). Both at the same torch threads; the vectors are compared.
2. Load. ``--load-vectors`` (100,000) real shapes scenes are rendered, written as shards (one caption each)
   and indexed with ``vlpt index`` (HNSW, tuned to recall@10 0.95). A real ``vlpt serve`` process answers
   ``--clients`` (32) concurrent keep-alive clients sending text searches (k=10, distinct captions of other
   scenes), a bounded number of requests; client-side p50 / p99 latency and requests/s; then the same
   with dynamic batching off (``--max-batch 1``): the ratio is ``batching_speedup``.
3. IVF-PQ at 1,000,000 vectors: the 100,000 real image vectors plus 900,000 made from them by augmentation in
   embedding space (a real vector plus a random direction of length 0.2-0.5, re-normalised: cosine 0.89-0.98
   to its source), indexed as ``vlpt index`` does (``build_faiss`` + ``tune_search``, target 0.95: the
   default search setting it saves), then recall@10 against exact search on fresh queries (images of scenes
   not in the index and captions), and single-query search latency.
4. Fuzzing: schemathesis over the OpenAPI schema of a live server with every model kind loaded (tiny models),
   ``--fuzz-examples`` valid and as many invalid requests per operation; plus explicit bad inputs (oversized
   body, decompression bomb, huge k, wrong types, empty text). Counts of statuses, 5xx and crashes.

The demo model is trained for ``--train-steps`` (300) on the tiny-shapes config unless ``--model`` names one
(e.g. a `vlpt demo` run): throughput depends on its shape only, recall on how its vectors spread.
Builds are cached under bench/runs/serving/ (reused by a re-run). Needs the test extra (schemathesis).

    .venv/bin/python bench/serving.py [--quick] [--model RUN] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO))
from common import write_results  # noqa: E402

from vlpt.data.shapes import CLASS_NAMES, ShapesConfig, ShapesDataset  # noqa: E402

WORK = REPO / "bench" / "runs" / "serving"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def scenes(n: int, seed: int, image_size: int = 64, chunk: int = 10_000) -> tuple[np.ndarray, list[str], list[int]]:
    """``n`` real shapes scenes (images, one caption each, labels), rendered in chunks (cached by vlpt)."""
    images, captions, labels = [], [], []
    for i, start in enumerate(range(0, n, chunk)):
        ds = ShapesDataset(ShapesConfig(split="test", size=min(chunk, n - start), image_size=image_size,
                                        seed=seed + i), cache_dir=WORK / "scenes")
        images.append(ds.images)
        captions += [c[0] for c in ds.captions]
        labels += [int(v) for v in ds.labels]
    return np.concatenate(images), captions, labels


# ----------------------------------------------------------------------------- the model

def demo_model(args) -> Path:
    """The demo model (tiny-shapes config), trained ``--train-steps`` steps; or ``--model``."""
    if args.model:
        return Path(args.model)
    run = WORK / f"demo-{args.train_steps}"
    if (run / "model" / "config.json").is_file():
        return run
    from vlpt.cli import main as vlpt_main
    from vlpt.config import load_config, save_config

    config = load_config("tiny-shapes", [f"train.steps={args.train_steps}", "data.train_size=5000",
                                         "train.checkpoint_every=0", "train.eval_every=0", "train.log_every=50",
                                         "eval.zero_shot_size=200", "eval.compositional_size=48",
                                         "eval.retrieval_size=200", "eval.probe_train_size=200"])
    WORK.mkdir(parents=True, exist_ok=True)
    save_config(config, WORK / "demo.yaml")
    log(f"training the demo model for {args.train_steps} steps")
    if vlpt_main(["train", "--config", str(WORK / "demo.yaml"), "--name", run.name, "--runs-dir", str(WORK),
                  "--overwrite"]) != 0:
        raise SystemExit("training the demo model failed")
    return run


# ----------------------------------------------------------------------------- 1. indexing throughput

def baseline_index(model, paths: list[Path], batch_size: int = 256) -> tuple[np.ndarray, float]:
    """clip-retrieval's way: PIL load + torchvision preprocessing per image, a batch, the model, faiss add."""
    import faiss
    from PIL import Image

    from vlpt.factory import image_transform

    preprocess = image_transform(model)  # the model's torchvision preprocessing (resize, crop, normalise)
    index = faiss.IndexFlatIP(model.config.embed_dim)
    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(paths), batch_size):
            batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[s:s + batch_size]])
            index.add(model.encode_image(batch).float().numpy())
    seconds = time.perf_counter() - start
    return index.reconstruct_n(0, index.ntotal), seconds


def indexing(model_dir: Path, n: int, repeats: int) -> dict:
    from PIL import Image

    from vlpt.factory import load_dual_encoder
    from vlpt.serve.index import IndexOptions, IndexReader, build_index

    folder = WORK / f"folder-{n}"
    if not (folder / "images" / f"{n - 1:06d}.png").is_file():
        log(f"writing {n} 64 px PNGs")
        images, _, _ = scenes(n, seed=100)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img).save(folder / "images" / f"{i:06d}.png")
    paths = sorted((folder / "images").glob("*.png"))
    ours, base = [], []
    for r in range(repeats):  # alternating, so slow drift of the machine hits both alike
        model = load_dual_encoder(model_dir).eval()
        base_vectors, seconds = baseline_index(model, paths)
        base.append(n / seconds)
        out = WORK / "folder-index"
        shutil.rmtree(out, ignore_errors=True)
        model = load_dual_encoder(model_dir).eval()  # loaded outside the timing, as for the baseline
        start = time.perf_counter()
        build_index(model_dir, folder, out, IndexOptions(index_type="flat"), progress=False, model=model)
        ours.append(n / (time.perf_counter() - start))
        log(f"indexing round {r + 1}: vlpt index {ours[-1]:.0f} images/s, baseline loop {base[-1]:.0f} images/s")
    _, vectors = IndexReader.open(WORK / "folder-index").vectors("image")
    cosine = float(np.min(np.sum(vectors * base_vectors / np.linalg.norm(base_vectors, axis=1, keepdims=True), 1)))
    return {"index_images_per_s": round(statistics.median(ours), 1),
            "index_baseline_images_per_s": round(statistics.median(base), 1),
            "index_ratio_vs_baseline": round(statistics.median(ours) / statistics.median(base), 3),
            "index_min_cosine_vs_baseline": round(cosine, 6)}


# ----------------------------------------------------------------------------- 2. load

def load_index(model_dir: Path, n: int) -> Path:
    """A ``vlpt index`` of ``n`` real scenes (written as shards, one caption each); reused when present."""
    from vlpt.data.shards import write_shards
    from vlpt.serve.index import IndexOptions, build_index

    shards, out = WORK / f"shards-{n}", WORK / f"index-{n}"
    if not (shards / "index.json").is_file():
        log(f"rendering {n} scenes and writing shards")
        images, captions, labels = scenes(n, seed=1000)
        data = SimpleNamespace(images=images, captions=[[c] for c in captions], labels=np.asarray(labels))
        write_shards(data, shards, 5000, class_names=list(CLASS_NAMES), overwrite=True)
    log(f"indexing {n} scenes (vlpt index, cached when done)")
    start = time.perf_counter()
    result = build_index(model_dir, shards, out, IndexOptions(), progress=False, overwrite=True)
    log(f"index ready in {time.perf_counter() - start:.0f} s: {result.manifest['indexes']['image']['search']}")
    return out


async def _client(port: int, bodies: list[bytes], counter: list[int], total: int, deadline: float,
                  latencies: list[float], statuses: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while counter[0] < total and time.perf_counter() < deadline:
            i = counter[0]
            counter[0] += 1
            body = bodies[i % len(bodies)]
            start = time.perf_counter()
            writer.write(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            status = int(head.split(b" ", 2)[1])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


def load_run(port: int, queries: list[str], clients: int, requests: int, warmup: int, max_seconds: float) -> dict:
    """``clients`` keep-alive connections send text searches until ``requests`` are answered (or the time is up)."""
    bodies = [json.dumps({"text": q, "k": 10}).encode() for q in queries]

    async def run(total: int, record: bool):
        counter, latencies, statuses = [0], [], {}
        deadline = time.perf_counter() + max_seconds
        start = time.perf_counter()
        await asyncio.gather(*(_client(port, bodies, counter, total, deadline, latencies, statuses)
                               for _ in range(clients)))
        return latencies, statuses, time.perf_counter() - start

    asyncio.run(run(warmup, False))
    latencies, statuses, seconds = asyncio.run(run(requests, True))
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "seconds": round(seconds, 2), "requests_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def load(index: Path, args) -> dict:
    from tests.serving import ServerProcess

    queries = scenes(2000 if not args.quick else 200, seed=5000)[1]  # captions of scenes not in the index
    figures, runs = {}, {}
    for name, batch in (("on", 32), ("off", 1)):
        server = ServerProcess(["--index", str(index), "--threads", "1", "--max-batch", str(batch),
                                "--max-wait-ms", "2", "--limit", "max_concurrency=256"], WORK / f"serve-{name}.log",
                               ready_within=600)
        try:
            runs[name] = load_run(server.port, queries, args.clients, args.requests, args.warmup, args.max_seconds)
            batches = mean_text_batch(server.url)
        finally:
            server.stop()
        runs[name]["mean_text_batch"] = batches
        log(f"load, batching {name}: {runs[name]}")
    figures.update(search_requests_per_s=runs["on"]["requests_per_s"], search_p50_ms=runs["on"]["p50_ms"],
                   search_p99_ms=runs["on"]["p99_ms"],
                   batching_speedup=round(runs["on"]["requests_per_s"] / runs["off"]["requests_per_s"], 3),
                   search_unbatched_requests_per_s=runs["off"]["requests_per_s"],
                   search_unbatched_p50_ms=runs["off"]["p50_ms"], search_unbatched_p99_ms=runs["off"]["p99_ms"],
                   search_mean_text_batch=runs["on"]["mean_text_batch"],
                   search_non_200=sum(v for k, v in runs["on"]["statuses"].items() if k != "200")
                   + sum(v for k, v in runs["off"]["statuses"].items() if k != "200"))
    return figures


def mean_text_batch(url: str) -> float:
    """The mean size of the text-encoder batches the server formed (from its /metrics)."""
    from vlpt.serve import Client

    values = {}
    for line in Client(url).metrics().splitlines():
        if line.startswith("vlpt_batch_size_") and 'batcher="text"' in line:
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return round(values["vlpt_batch_size_sum"] / max(1.0, values["vlpt_batch_size_count"]), 2)


# ----------------------------------------------------------------------------- 3. IVF-PQ at 1M

def ivfpq(model_dir: Path, index_dir: Path, n: int, queries_n: int) -> dict:
    import faiss

    from vlpt.factory import load_dual_encoder
    from vlpt.serve.index import (
        IndexOptions,
        IndexReader,
        build_faiss,
        channels_last,
        exact_neighbours,
        recall_at,
        tune_search,
    )

    reader = IndexReader.open(index_dir)
    _, real = reader.vectors("image")
    _, captions_of_index = reader.vectors("text")  # as `vlpt index` tunes: the captions as queries too
    del reader
    rng = np.random.default_rng(0)
    extra = n - len(real)
    log(f"IVF-PQ: {len(real)} real vectors + {extra} augmented")
    source = rng.integers(0, len(real), extra)
    noise = rng.standard_normal((extra, real.shape[1])).astype(np.float32)
    noise *= (rng.uniform(0.2, 0.5, extra) / np.linalg.norm(noise, axis=1))[:, None].astype(np.float32)
    made = real[source] + noise
    made /= np.linalg.norm(made, axis=1, keepdims=True)
    vectors = np.ascontiguousarray(np.concatenate([real, made]), np.float32)
    del made, noise

    model = channels_last(load_dual_encoder(model_dir).eval())
    images, captions, _ = scenes(queries_n, seed=9000)  # fresh scenes: not in the index
    with torch.inference_mode():
        image_q = np.concatenate([model.encode_image(torch.from_numpy(images[s:s + 256])).numpy()
                                  for s in range(0, len(images), 256)])
        text_q = np.concatenate([model.encode_text(captions[s:s + 256]).numpy() for s in range(0, len(captions), 256)])

    start = time.perf_counter()
    index, info = build_faiss(vectors, "ivfpq", IndexOptions())
    search = tune_search(index, info, vectors, 0.95, other=captions_of_index)
    build_s = time.perf_counter() - start
    log(f"IVF-PQ built and tuned in {build_s:.0f} s: {info['factory']}, {search}")
    out = {"ivfpq_vectors": len(vectors), "ivfpq_factory": info["factory"], "ivfpq_build_s": round(build_s, 1),
           "ivfpq_search_setting": {k: v for k, v in search.items() if k != "tuned_on"}}
    recalls, strict = {}, {}
    for name, queries in (("image", image_q), ("text", text_q)):
        truth = exact_neighbours(vectors, queries, 10)
        recalls[name] = recall_at(index, vectors, queries, truth, 10)  # ann-benchmarks' definition (ties)
        _, found = index.search(np.ascontiguousarray(queries, np.float32), 10)
        strict[name] = float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))  # the same ids
    faiss.omp_set_num_threads(1)  # one query at a time on one thread, as a server's search batcher would at low load
    times = []
    for q in np.concatenate([image_q, text_q])[:1000]:
        start = time.perf_counter()
        index.search(q[None], 10)
        times.append((time.perf_counter() - start) * 1000)
    faiss.omp_set_num_threads(torch.get_num_threads())
    truth = exact_neighbours(vectors, np.concatenate([image_q, text_q]), 11)
    scores = np.einsum("qd,qkd->qk", np.concatenate([image_q, text_q]), vectors[truth])
    out.update(ivfpq_recall_at_10=round((recalls["image"] + recalls["text"]) / 2, 4),
               ivfpq_recall_at_10_image_queries=round(recalls["image"], 4),
               ivfpq_recall_at_10_text_queries=round(recalls["text"], 4),
               ivfpq_recall_at_10_same_ids=round((strict["image"] + strict["text"]) / 2, 4),
               ivfpq_queries_10th_11th_gap_under_tolerance=round(float(np.mean(scores[:, 9] - scores[:, 10] < 1e-3)), 4),
               ivfpq_search_p50_ms=round(float(np.percentile(times, 50)), 3),
               ivfpq_search_p99_ms=round(float(np.percentile(times, 99)), 3))
    return out


# ----------------------------------------------------------------------------- 4. fuzzing

def fuzzing(examples: int) -> dict:
    import urllib.error
    import urllib.request

    from tests.serving import ServerProcess, fuzz_server, shapes_folder, tiny_models
    from tests.test_cli_errors import png_header
    from vlpt.serve.index import build_index

    root = WORK / "fuzz"
    shutil.rmtree(root, ignore_errors=True)
    models = tiny_models(root / "models")
    shapes_folder(root / "folder", 24)
    build_index(models["model"], root / "folder", root / "index", progress=False)
    server = ServerProcess(["--index", str(root / "index"), "--caption", str(models["caption"]),
                            "--vqa", str(models["vqa"]), "--match", str(models["match"]),
                            "--generate", str(models["generate"]), "--limit", "max_body_bytes=262144",
                            "--limit", "max_generate_steps=4"], root / "server.log")
    try:
        log(f"fuzzing {server.url} with schemathesis ({examples} valid + {examples} invalid per operation)")
        report = fuzz_server(server.url, examples=examples)
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        bad = {"oversized body": {"text": "x" * 300_000}, "bomb image": {"image": b64(png_header(100_000, 100_000))},
               "huge k": {"text": "a red circle", "k": 10 ** 12}, "wrong type": {"text": 42, "k": "ten"},
               "empty text": {"text": ""}}
        explicit = {}
        for name, payload in bad.items():
            req = urllib.request.Request(server.url + "/search", json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    explicit[name] = r.status
            except urllib.error.HTTPError as err:
                explicit[name] = err.code
        alive = server.alive()
    finally:
        server.stop()
    log(f"fuzzing: {report['requests']} requests, statuses {report['statuses']}; explicit: {explicit}")
    return {"fuzz_requests": report["requests"], "fuzz_5xx": report["server_errors"],
            "fuzz_statuses": report["statuses"], "fuzz_operations": len(report["operations"]),
            "fuzz_server_crashes": 0 if alive else 1, "fuzz_explicit_bad_inputs": explicit,
            "fuzz_explicit_all_4xx": all(400 <= s < 500 for s in explicit.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the machine")
    parser.add_argument("--model", help="a model or run folder (default: the demo config, trained --train-steps)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2, help="torch / faiss threads of this process")
    parser.add_argument("--index-images", type=int, default=8192, help="PNGs in the indexing-throughput folder")
    parser.add_argument("--repeats", type=int, default=2, help="indexing rounds (median)")
    parser.add_argument("--load-vectors", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=6000, help="requests per load run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--max-seconds", type=float, default=120, help="a load run stops after this long")
    parser.add_argument("--ivfpq-vectors", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000, help="fresh queries for IVF-PQ recall (each kind)")
    parser.add_argument("--fuzz-examples", type=int, default=None,
                        help="per operation and mode (valid / invalid); default 80 (--quick: 5)")
    parser.add_argument("--only", nargs="*", choices=["index", "load", "ivfpq", "fuzz"], default=None)
    args = parser.parse_args()
    global WORK
    if args.quick:
        WORK = WORK.with_name("serving-quick")
        args.train_steps, args.index_images, args.repeats = 5, 512, 1
        args.load_vectors, args.requests, args.warmup, args.ivfpq_vectors = 3000, 400, 50, 30_000
        args.queries = 100
    if args.fuzz_examples is None:
        args.fuzz_examples = 5 if args.quick else 80
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import faiss

    faiss.omp_set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    parts = set(args.only or ["index", "load", "ivfpq", "fuzz"])
    started = time.perf_counter()
    model_dir = demo_model(args) if parts & {"index", "load", "ivfpq"} else None
    figures: dict = {}
    if "index" in parts:
        figures.update(indexing(model_dir, args.index_images, args.repeats))
    if parts & {"load", "ivfpq"}:
        index = load_index(model_dir, args.load_vectors)
        if "load" in parts:
            figures.update(load(index, args))
        if "ivfpq" in parts:
            figures.update(ivfpq(model_dir, index, args.ivfpq_vectors, args.queries))
    if "fuzz" in parts:
        figures.update(fuzzing(args.fuzz_examples))
    figures["wall_seconds"] = round(time.perf_counter() - started, 1)
    config = {k: v for k, v in vars(args).items() if k != "only"} | {
        "parts": sorted(parts), "model": str(model_dir), "server": "vlpt serve --threads 1 --max-wait-ms 2",
        "load_query": "POST /search {text, k: 10} on the image index (HNSW)"}
    write_results("serving-quick" if args.quick else "serving", figures, config)


if __name__ == "__main__":
    main()
