"""The web page of `vlpt serve` in a real browser: Debian's headless Chromium driven by Playwright (the system
browser as its executable; `playwright install` is never run). A tiny model is trained on shapes scenes for a
few hundred steps (it learns colours well by then), a folder of single-object scenes is indexed with
`vlpt index`, and a real `vlpt serve` process serves it with a VQA model, a captioner and a generator. The test
types a query, uploads and drops images, clicks a result, asks a question, captions, generates, and saves a
screenshot (``VLPT_WEB_SCREENSHOT=docs/serving-page.png`` also writes it there, as the docs' picture).

When the browser is missing the test FAILS and says how to install it (`make test` installs it with apt)."""

import base64
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.serving import ServerProcess, shapes_folder
from tests.test_generator import tiny_generator_config
from vlpt.cli import main
from vlpt.config import load_config, save_config
from vlpt.data.shapes import CLASS_NAMES
from vlpt.serve import Client

VQA_OUTPUTS = ["red", "green", "blue", "yellow", "purple", "yes", "no"]
QUERY, QUERY_COLOR = "a blue star", "blue"  # not a held-out (colour, shape) pair of the shapes world
TIMEOUT_MS = 60_000


def find_chromium() -> str:
    """The system Chromium; a test failure (never a skip) naming the install command when there is none."""
    for name in (os.environ.get("VLPT_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (found := shutil.which(name)):
            return found
    pytest.fail("headless Chromium is needed for the web page test and was not found: install Debian's package "
                "with `apt-get install chromium` (`make test` does this), or set VLPT_CHROMIUM to a Chromium binary")


def train_model(root: Path) -> Path:
    """A tiny dual encoder trained with `vlpt train` on single-object shapes scenes (about a minute on one core;
    at 400 steps blue and purple were still close: "a blue star" ranked a purple circle third)."""
    sets = ["model.embed_dim=32", "model.image.image_size=32", "model.text.hidden_size=32", "model.text.num_layers=1",
            "model.text.intermediate_size=64", "model.text.vocab_size=200", "data.image_size=32",
            "data.train_size=2000", "data.twins=false", "data.count_weights=[1,0,0]", "train.steps=800",
            "train.batch_size=64", "train.warmup_steps=10", "train.lr=0.005", "train.log_every=50",
            "train.checkpoint_every=0", "train.eval_every=0", "eval.zero_shot_size=64", "eval.compositional_size=48",
            "eval.retrieval_size=64", "eval.probe_train_size=128"]
    save_config(load_config("tiny-shapes", sets), root / "web.yaml")
    assert main(["train", "--config", str(root / "web.yaml"), "--name", "web", "--runs-dir", str(root / "runs")]) == 0
    return root / "runs" / "web"


def application_models(run: Path, root: Path) -> dict[str, Path]:
    """A VQA model, a captioner and a generator on the trained dual encoder (their heads untrained: the page's
    panels are what is tested, not their answers)."""
    from vlpt.factory import load_dual_encoder
    from vlpt.models.captioner import Captioner, CaptionerConfig
    from vlpt.models.fusion import FusionConfig
    from vlpt.models.generator import TextToImageGenerator
    from vlpt.models.task_model import TaskModel, TaskModelConfig

    torch.manual_seed(0)
    dual = lambda: load_dual_encoder(run / "model")  # noqa: E731
    return {
        "vqa": TaskModel(TaskModelConfig(task="vqa", outputs=VQA_OUTPUTS, fusion=FusionConfig(method="concat")),
                         dual()).save_pretrained(root / "vqa"),
        "caption": Captioner(CaptionerConfig(width=32, layers=1, heads=2), dual()).save_pretrained(root / "captioner"),
        "generate": TextToImageGenerator(tiny_generator_config(), dual()).save_pretrained(root / "generator"),
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    chromium = find_chromium()  # first: a missing browser fails at once, before any training
    root = tmp_path_factory.mktemp("web")
    run = train_model(root)
    models = application_models(run, root)
    data = shapes_folder(root / "folder", 48, image_size=64, max_objects=1, broken=False)
    assert main(["index", str(run), str(root / "folder"), str(root / "index"), "--no-progress"]) == 0
    server = ServerProcess(["--index", str(root / "index"), "--vqa", str(models["vqa"]), "--caption",
                            str(models["caption"]), "--generate", str(models["generate"]),
                            "--limit", "max_generate_steps=100"], root / "server.log")
    yield {"root": root, "server": server, "chromium": chromium, "data": data}
    server.stop()


def labels_shown(page) -> list[str]:
    return page.eval_on_selector_all("#results figure.result", "cards => cards.map(c => c.dataset.label)")


def ids_shown(page) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all("#results figure.result", "cards => cards.map(c => c.dataset.id)")]


def wait_searches(page, n: int) -> None:
    page.wait_for_function(f"() => document.body.dataset.searches === '{n}'", timeout=TIMEOUT_MS)


def wait_thumbnails(page, first: int) -> None:
    """The first ``first`` result thumbnails are loaded images (served by GET /items/{id}/image)."""
    page.wait_for_function(
        f"() => {{ const imgs = [...document.querySelectorAll('#results img')].slice(0, {first});"
        f" return imgs.length === {first} && imgs.every(i => i.complete && i.naturalWidth > 0); }}",
        timeout=TIMEOUT_MS)


def test_the_page_in_a_real_browser(site, tmp_path):
    from playwright.sync_api import sync_playwright

    url, folder = site["server"].url, site["root"] / "folder"
    client = Client(url)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=site["chromium"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            outside: list[str] = []  # the page fetches nothing from anywhere but this server
            page.on("request", lambda r: None if r.url.startswith(url) or r.url.startswith(("data:", "blob:"))
                    else outside.append(r.url))
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=TIMEOUT_MS)
            assert "48 images" in page.inner_text("#status")
            assert page.is_visible("#answer-panel") is False  # shown once there is an image to ask about
            assert page.is_visible("#generate-panel")

            # 1. type a query: the top results show objects of the colour asked for, with thumbnails and scores
            page.fill("#query", QUERY)
            page.press("#query", "Enter")
            wait_searches(page, 1)
            top = labels_shown(page)[:3]
            assert len(labels_shown(page)) == 16 and all(label.startswith(QUERY_COLOR) for label in top), top
            wait_thumbnails(page, 4)
            scores = [float(s) for s in page.eval_on_selector_all("#results .score", "e => e.map(x => x.textContent)")]
            assert scores == sorted(scores, reverse=True)
            page.screenshot(path=str(tmp_path / "text-search.png"))

            # 2. upload an image of the collection: it comes back first, and the panels work on it
            page.set_input_files("#upload", str(folder / "images" / "00010.png"))
            wait_searches(page, 2)
            first = ids_shown(page)[0]
            assert client.item(first)["path"] == "images/00010.png"
            assert labels_shown(page)[0] == CLASS_NAMES[site["data"].labels[10]]
            assert float(page.inner_text("#results .score")) == pytest.approx(1.0, abs=1e-3)
            wait_thumbnails(page, 4)
            assert page.is_visible("#current-panel") and page.is_visible("#answer-panel")

            # 3. drop an image on the drop zone (a real drop event carrying a file)
            dropped = base64.b64encode((folder / "images" / "00020.png").read_bytes()).decode()
            page.evaluate("""async (b64) => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer,
                                                                                  bubbles: true, cancelable: true}));
            }""", dropped)
            wait_searches(page, 3)
            assert client.item(ids_shown(page)[0])["path"] == "images/00020.png"

            # 4. click a result: the page searches by it (it comes back first) and makes it the current image
            clicked = ids_shown(page)[2]
            page.click(f"#results figure.result[data-id='{clicked}']")
            wait_searches(page, 4)
            assert ids_shown(page)[0] == clicked and f"item #{clicked}" in page.inner_text("#summary")
            page.wait_for_function(f"() => document.getElementById('current-source').textContent === 'item #{clicked}'",
                                   timeout=TIMEOUT_MS)

            # 5. ask a question about it, and caption it
            page.fill("#question", "what color is the shape?")
            page.click("#ask")
            page.wait_for_selector("#answer[data-answer]", timeout=TIMEOUT_MS)
            answer = page.get_attribute("#answer", "data-answer")
            assert answer in VQA_OUTPUTS and "p=" in page.inner_text("#answer")
            page.click("#caption-button")
            page.wait_for_function("() => document.getElementById('caption').textContent.length > 0",
                                   timeout=TIMEOUT_MS)

            # 6. generate an image from a prompt
            page.fill("#prompt", "a large blue star in the center")
            page.click("#generate")
            page.wait_for_function("() => { const i = document.getElementById('generated');"
                                   " return !i.hidden && i.complete && i.naturalWidth > 0; }", timeout=TIMEOUT_MS)
            assert page.evaluate("document.getElementById('generated').naturalWidth") == 32

            # 7. a file the server cannot read: its 4xx message is shown to the user, the page keeps working
            page.set_input_files("#upload", files=[{"name": "broken.png", "mimeType": "image/png",
                                                    "buffer": b"\x89PNG this is not an image"}])
            page.wait_for_selector("#error:not([hidden])", timeout=TIMEOUT_MS)
            assert "not an image" in page.inner_text("#error")
            assert page.inner_text("#current-source") == f"item #{clicked}"  # the refused file did not replace it
            assert page.get_attribute("#answer", "data-answer") == answer
            page.fill("#query", QUERY)
            page.press("#query", "Enter")
            wait_searches(page, 5)
            page.wait_for_selector("#error", state="hidden", timeout=TIMEOUT_MS)
            wait_thumbnails(page, 8)

            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert errors == [] and outside == [], (errors, outside)
        finally:
            browser.close()
    with Image.open(shot) as img:
        assert img.size[0] == 1200 and img.size[1] >= 1000
    if os.environ.get("VLPT_WEB_SCREENSHOT"):  # the docs' picture, refreshed on request
        shutil.copy(shot, os.environ["VLPT_WEB_SCREENSHOT"])
    assert site["server"].alive()
