"""Fuzz test: whatever a user types, ``vlpt`` answers with its result (exit status 0) or with exactly one line
``vlpt: error: ...`` on stderr (exit status 2) -- never a traceback.

Two generated sets, run in-process through ``vlpt.cli.main`` (deterministic: hypothesis derandomized):

- ``vlpt train --dry-run`` with random config overrides: real keys, misspelt keys, nested and junk keys;
  ints (negative, zero, huge), floats (NaN, inf), strings, lists, mappings, YAML junk, the names the
  choices allow; and random config files. ``--dry-run`` checks the config and starts nothing, so valid
  override sets are covered too (they print the config as YAML).
- ``vlpt classify | embed | eval`` with random paths and files: empty, text, truncated and random-byte
  images, PNG headers of any size (decompression bombs), folders, missing paths; model folders with a
  corrupt or missing safetensors file, a broken config.json or tokenizer; run folders with bad configs.
"""

import dataclasses
import json
import shutil
import struct
import typing
import zlib
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import save_tiny_model, tiny_run_config
from vlpt import config as C
from vlpt.cli import main
from vlpt.config import RunConfig, list_configs, save_config

TRAIN_CASES = 1000
FILE_CASES = 400
FUZZ = dict(derandomize=True, database=None, deadline=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def config_keys(cls=RunConfig, prefix="") -> tuple[list[str], list[str]]:
    """(leaf keys, section keys) of the config dataclasses, dotted."""
    leaves, sections = [], []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            sections.append(prefix + f.name)
            sub_leaves, sub_sections = config_keys(hint, f"{prefix}{f.name}.")
            leaves += sub_leaves
            sections += sub_sections
        else:
            leaves.append(prefix + f.name)
    return leaves, sections


LEAVES, SECTIONS = config_keys()
CHOICES = sorted({*C.DATASETS, *C.LOSSES, *C.SIGLIP_EXCHANGES, *C.ACCUM_MODES, *C.PRECISIONS, *C.IMAGE_POOLS,
                  *C.TEXT_POOLS, *C.FINETUNE_TASKS, *C.FUSION_METHODS, *C.INIT_HEADS, *C.BETA_SCHEDULES,
                  *C.PREDICTION_TYPES, "contrastive", "caption", "coca", "generate", "cpu", "cuda:0", "auto"})
YAML_JUNK = ["[1,", "{a: [}", ": :", "!!python/object/apply:os.system ['true']", "&a [*a, *a]", "*undefined",
             "- - -", "%TAG ! x", "'unterminated", "\t", "{", "]", "? ? ?", "!!binary AAAA", "2024-01-01", "1:30",
             "0x1F", "~", "null", "", "'[1, 2]'", "{a: 1, a: 2}", "[[[[[[[[[[]]]]]]]]]]", "!!set {a, b}", "\x00",
             "---\n- a\n---\n- b", "@", "`", "|", ">", "%"]


def misspelt(key: str, data: st.DataObject) -> str:
    i = data.draw(st.integers(0, max(0, len(key) - 1)))
    how = data.draw(st.sampled_from(["drop", "double", "swap", "upper", "dash"]))
    if how == "drop":
        return key[:i] + key[i + 1:]
    if how == "double":
        return key[:i] + key[i] + key[i:]
    if how == "swap" and i + 1 < len(key):
        return key[:i] + key[i + 1] + key[i] + key[i + 2:]
    if how == "upper":
        return key.upper()
    return key.replace("_", "-")


@st.composite
def override_keys(draw):
    kind = draw(st.sampled_from(["leaf"] * 6 + ["section", "misspelt", "nested", "junk", "empty"]))
    if kind == "leaf":
        return draw(st.sampled_from(LEAVES))
    if kind == "section":
        return draw(st.sampled_from(SECTIONS))
    if kind == "misspelt":
        return misspelt(draw(st.sampled_from(LEAVES)), draw(st.data()))
    if kind == "nested":
        return draw(st.sampled_from(LEAVES + SECTIONS)) + "." + draw(st.sampled_from(["x", "steps", "0", "", "a.b"]))
    if kind == "junk":
        return draw(st.text(alphabet="abcdeflmnoprstx_.-0= \n\u00e9", max_size=16))
    return ""


scalars = st.one_of(st.integers(-10, 10), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.none(), st.text(max_size=8), st.sampled_from(CHOICES))
values = st.one_of(
    st.integers(-3, 300).map(str),  # small ints: often valid
    st.integers(-2**80, 2**80).map(str),  # huge ints
    st.floats(allow_nan=True, allow_infinity=True).map(repr),  # 'nan', 'inf', '1e+300': strings to YAML 1.1
    st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),  # NaN, Infinity
    st.sampled_from([".nan", ".inf", "-.inf", "0.5", "1.0", "-0.0", "1e-3", "1e400"]),
    st.sampled_from(["true", "false", "yes", "no", "on", "0", "1", "True", "FALSE"]),
    st.sampled_from(CHOICES),
    st.text(max_size=24),  # anything, newlines and control characters included
    st.lists(scalars, max_size=4).map(json.dumps),
    st.dictionaries(st.text(max_size=6), scalars, max_size=3).map(json.dumps),
    st.sampled_from(YAML_JUNK),
)


@st.composite
def overrides(draw):
    key, value = draw(override_keys()), draw(values)
    return draw(st.sampled_from([f"{key}={value}"] * 9 + [key, f"{key}=={value}"]))  # some without '='


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Config files, images, model and run folders, good and bad; made once for the module."""
    root = tmp_path_factory.mktemp("fuzz")
    good = save_tiny_model(root / "model")
    configs = root / "configs"
    configs.mkdir()
    save_config(tiny_run_config(steps=2), configs / "tiny.yaml")
    save_config(tiny_run_config(steps=2), configs / "tiny.json")
    (configs / "junk.yaml").write_text("train: {steps: 3\n  batch_size: [\n")
    (configs / "list.yaml").write_text("- a\n- b\n")
    (configs / "bad.json").write_text('{"train": }')
    (configs / "values.yaml").write_text("train: {steps: -1, lr: abc}\nmodel: {embed_dim: 0}\n")
    (configs / "empty.yaml").write_text("")
    config_paths = [str(p) for p in sorted(configs.iterdir())] + [str(configs), str(root / "missing.yaml")]

    images = root / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), "red").save(images / "good.png")
    Image.new("L", (16, 16), 128).save(images / "gray.png")
    Image.new("RGBA", (20, 20), (0, 0, 255, 100)).save(images / "rgba.png")
    Image.new("RGB", (40, 30), "blue").save(images / "good.jpg")
    (images / "empty.png").write_bytes(b"")
    (images / "text.png").write_text("a red circle\n")
    good_png = (images / "good.png").read_bytes()
    (images / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (images / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (images / "big.png").write_bytes(png_header(10_000, 10_000))
    (images / "folder.png").mkdir()
    shutil.copy(good / "model.safetensors", images / "weights.png")
    image_paths = [str(p) for p in sorted(images.iterdir())] + [str(images / "missing.png"), str(images)]

    models = root / "models"
    models.mkdir()
    damage = {
        "garbage-weights": lambda d: (d / "model.safetensors").write_bytes(b"\x07" * 100),
        "truncated-weights": lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:3000]),
        "empty-weights": lambda d: (d / "model.safetensors").write_bytes(b""),
        "no-weights": lambda d: (d / "model.safetensors").unlink(),
        "no-config": lambda d: (d / "config.json").unlink(),
        "bad-config": lambda d: (d / "config.json").write_text("{\"embed_dim\": "),
        "list-config": lambda d: (d / "config.json").write_text("[1, 2]"),
        "bad-value": lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"image_size": 32', '"image_size": -32')),
        "other-kind": lambda d: (d / "config.json").write_text('{"model_type": "vlpt-captioner"}'),
        "bad-tokenizer": lambda d: (d / "tokenizer" / "tokenizer.json").write_text("[]"),
    }
    model_paths = [str(good), str(root / "missing-model"), str(images / "good.png"), str(images)]
    for name, hurt in damage.items():
        shutil.copytree(good, models / name)
        hurt(models / name)
        model_paths.append(str(models / name))

    runs = root / "runs"  # run folders `vlpt eval` fails on before any data is rendered
    for name, config_text, model in [
        ("junk-config", "train: [", good), ("list-config", "- 1\n", good),
        ("bad-values", "train: {steps: 0}\ndata: {dataset: shapez}\n", good), ("no-model", None, None),
        ("broken-model", None, models / "garbage-weights"), ("bad-model-config", None, models / "bad-config"),
    ]:
        (runs / name).mkdir(parents=True)
        if config_text is None:
            save_config(tiny_run_config(steps=2), runs / name / "config.yaml")
        else:
            (runs / name / "config.yaml").write_text(config_text)
        if model is not None:
            shutil.copytree(model, runs / name / "model")
    run_paths = [str(p) for p in sorted(runs.iterdir())] + [str(root / "missing-run"), str(good), str(images)]
    return dict(root=root, configs=config_paths, images=image_paths, models=model_paths, runs=run_paths,
                good_png=good_png)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels, with a few bytes of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def check_answer(capsys, argv: list[str]) -> tuple[int, str]:
    """Run ``vlpt argv``: no traceback; success, or exactly one ``vlpt: error:`` line and status 2.
    Returns (status, stdout)."""
    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, argv
    if status == 0:
        assert err == "", (argv, err)
    else:
        lines = err.splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("vlpt: error: "), (argv, status, err)
    return status, out


def test_train_overrides_and_config_files_never_give_a_traceback(files, capsys):
    outcomes = Counter()

    @settings(max_examples=TRAIN_CASES, **FUZZ)
    @given(config=st.sampled_from(list_configs() * 3 + files["configs"]), sets=st.lists(overrides(), max_size=4),
           command=st.sampled_from(["train"] * 9 + ["finetune"]), task=st.sampled_from(C.FINETUNE_TASKS))
    def case(config, sets, command, task):
        argv = [command, "--dry-run", "--config", config, *(f"--set={item}" for item in sets)]
        if command == "finetune":
            argv += ["--task", task]
        status, out = check_answer(capsys, argv)
        if status == 0:  # the checked config, and nothing started
            assert set(yaml.safe_load(out)) == {f.name for f in dataclasses.fields(RunConfig)}
        outcomes[status] += 1

    case()
    assert sum(outcomes.values()) >= TRAIN_CASES and outcomes[0] >= 20 and outcomes[2] >= 200, outcomes


def test_classify_embed_and_eval_on_bad_files_never_give_a_traceback(files, capsys):
    outcomes = Counter()
    made = Path(files["root"]) / "made"
    made.mkdir()
    images = st.one_of(
        st.sampled_from(files["images"]),
        st.binary(max_size=300).map(lambda b: ("bin", b)),  # random bytes
        st.binary(max_size=200).map(lambda b: ("bin", b"\x89PNG\r\n\x1a\n" + b)),  # a PNG signature, then noise
        st.integers(0, len(files["good_png"]) - 1).map(lambda n: ("bin", files["good_png"][:n])),  # truncated
        st.one_of(st.tuples(st.integers(0, 64), st.integers(0, 64)),  # any declared size: small or a bomb
                  st.tuples(st.integers(20_000, 2**31 - 1), st.integers(20_000, 2**31 - 1))).map(
            lambda wh: ("bin", png_header(*wh))),
        st.text(max_size=12).map(lambda t: str(made / ("random-" + t.replace("/", "_").replace("\x00", "")))),
    )

    def materialise(image) -> str:
        if isinstance(image, str):
            return image
        path = made / f"{sum(outcomes.values())}-{len(list(made.iterdir()))}.png"
        path.write_bytes(image[1])
        return str(path)

    @settings(max_examples=FILE_CASES, **FUZZ)
    @given(command=st.sampled_from(["classify", "embed-image", "embed-text", "eval"]),
           paths=st.lists(images, min_size=1, max_size=3),
           model=st.sampled_from(files["models"][:1] * 6 + files["models"]),  # the good model often
           run=st.sampled_from(files["runs"]),
           labels=st.one_of(st.just("a red circle,a blue star"), st.just("a,b"),
                            st.sampled_from(["x", ",", "a,,b", " , ", ""]), st.text(max_size=20)),
           texts=st.lists(st.text(max_size=12), min_size=1, max_size=3))
    def case(command, paths, model, run, labels, texts):
        if command == "classify":
            argv = ["classify", *map(materialise, paths), f"--labels={labels}", "--model", model]
        elif command == "embed-image":
            argv = ["embed", "--image", *map(materialise, paths), "--model", model]
        elif command == "embed-text":  # a leading space keeps a text like "-x" from reading as an option
            argv = ["embed", "--text", *(" " + t if t.startswith("-") else t for t in texts), "--model", model]
        else:
            argv = ["eval", run]
        outcomes[command, check_answer(capsys, argv)[0]] += 1

    case()
    assert sum(outcomes.values()) >= FILE_CASES, outcomes
    assert outcomes["classify", 0] + outcomes["embed-image", 0] + outcomes["embed-text", 0] >= 5, outcomes
    assert outcomes["eval", 2] >= 10 and outcomes["classify", 2] + outcomes["embed-image", 2] >= 50, outcomes
