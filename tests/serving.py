"""Helpers shared by tests/test_index.py, test_serve.py and test_web.py: real files (shapes scenes as PNGs, a
captions file, broken images, tar shards), tiny models of every kind, and a real `vlpt serve` process."""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

from tests.test_cli_errors import png_header
from vlpt.data.shapes import CLASS_NAMES, ShapesConfig, ShapesDataset

REPO = Path(__file__).resolve().parents[1]


def shapes_folder(root: Path, n: int, image_size: int = 64, captions: bool = True, broken: bool = True,
                  max_objects: int = 3, seed: int = 0) -> ShapesDataset:
    """``n`` shapes test scenes as PNGs under ``root/images`` with a captions.csv (two captions and the label per
    image); ``broken``: also a file that is not an image, a truncated PNG, a decompression bomb (its header
    declares 100,000 x 100,000 pixels) and a row naming a missing file."""
    ds = ShapesDataset(ShapesConfig(split="test", size=n, image_size=image_size, max_objects=max_objects,
                                    seed=seed), cache_dir=None)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(ds.images[i]).save(root / "images" / f"{i:05d}.png")
        rows += [(f"images/{i:05d}.png", c, CLASS_NAMES[ds.labels[i]]) for c in ds.captions[i][:2]]
    if broken:
        (root / "images" / "not-an-image.png").write_bytes(b"this is not a png")
        good = (root / "images" / "00000.png").read_bytes()
        (root / "images" / "truncated.png").write_bytes(good[:len(good) // 2])
        (root / "images" / "bomb.png").write_bytes(png_header(100_000, 100_000))
        rows += [("images/not-an-image.png", "a broken file", ""), ("images/truncated.png", "half a file", ""),
                 ("images/bomb.png", "a decompression bomb", ""), ("images/missing.png", "a missing file", "")]
    if captions:
        with open(root / "captions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "caption", "label"])
            writer.writerows(rows)
    return ds


BROKEN = {"images/not-an-image.png", "images/truncated.png", "images/bomb.png", "images/missing.png"}


def add_corrupt_sample(shard: Path) -> None:
    """Rewrite a tar shard with one extra sample whose image is garbage (key ``zz-corrupt``)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
        for name, data in (("zz-corrupt.png", b"\x89PNG garbage"), ("zz-corrupt.txt", b"a corrupt sample")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def tiny_models(root: Path) -> dict[str, Path]:
    """A tiny dual encoder, captioner, vqa and match model and generator, each saved in its own folder."""
    import torch

    from tests.conftest import TINY_CORPUS, tiny_model_config
    from tests.test_generator import tiny_generator_config
    from vlpt.factory import create_model
    from vlpt.models.captioner import Captioner, CaptionerConfig
    from vlpt.models.fusion import FusionConfig
    from vlpt.models.generator import TextToImageGenerator
    from vlpt.models.task_model import TaskModel, TaskModelConfig

    def dual():
        return create_model(tiny_model_config(), corpus=TINY_CORPUS, seed=0)

    torch.manual_seed(0)
    paths = {"model": dual().save_pretrained(root / "dual")}
    paths["caption"] = Captioner(CaptionerConfig(width=32, layers=1, heads=2), dual()
                                 ).save_pretrained(root / "captioner")
    paths["vqa"] = TaskModel(TaskModelConfig(task="vqa", outputs=["red", "blue", "green", "yes", "no"],
                                             fusion=FusionConfig(method="concat")), dual()).save_pretrained(root / "vqa")
    paths["match"] = TaskModel(TaskModelConfig(task="match", fusion=FusionConfig(method="concat")), dual()
                               ).save_pretrained(root / "match")
    paths["generate"] = TextToImageGenerator(tiny_generator_config(), dual()).save_pretrained(root / "generator")
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`vlpt serve ARGS` on a free 127.0.0.1 port, in its own process; waits until GET /ready answers 200."""

    def __init__(self, args: list[str], log: Path, ready_within: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "vlpt", "serve", "--port", str(self.port), *args],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + ready_within
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vlpt serve exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vlpt serve not ready within {ready_within} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fuzz_server(url: str, examples: int = 60, seed: int = 0) -> dict:
    """schemathesis over the server's OpenAPI schema: for every operation, ``examples`` requests generated to fit
    the schema and ``examples`` generated to break it (wrong types, out-of-range values, missing fields), each
    sent to the live server. Returns the request count per status and the operations covered."""
    from collections import Counter

    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    statuses: Counter = Counter()
    operations = []
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        operations.append(f"{operation.method.upper()} {operation.path}")
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @hypothesis_seed(seed)
            @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                      suppress_health_check=list(HealthCheck))
            @given(operation.as_strategy(generation_mode=mode))
            def send(case):
                response = case.call(base_url=url, session=session, timeout=60)
                statuses[response.status_code] += 1

            try:
                send()
            except Unsatisfiable:  # nothing to break: an operation without parameters or body (GET /health)
                if mode == schemathesis.GenerationMode.POSITIVE:
                    raise
    return {"statuses": dict(statuses), "requests": sum(statuses.values()), "operations": operations,
            "server_errors": sum(n for s, n in statuses.items() if s >= 500)}
