"""Config checking at load (vlpt.config): types, ranges, choices, rules between fields, files, overrides."""

import dataclasses
import json

import pytest
import torch

from vlpt import config as C
from vlpt.config import ConfigError, RunConfig, apply_overrides, from_dict, list_configs, load_config, validate_config


def error_of(*overrides: str, config: str = "tiny-shapes") -> ConfigError:
    with pytest.raises(ConfigError) as error:
        load_config(config, list(overrides))
    return error.value


# ----------------------------------------------------------------------------- what passes

def test_defaults_and_every_shipped_config_pass():
    from vlpt.tasks import task_names

    validate_config(RunConfig())
    for name in list_configs():
        validate_config(load_config(name), task_names())


def test_numbers_are_converted_where_that_is_safe():
    config = load_config("tiny-shapes", ["train.lr=1", "train.min_lr=1e-5", "data.count_weights=[1, 2, 0]",
                                         "generate.guidance=[2]", "data.path=null"])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)  # an integer where a number goes
    assert config.train.min_lr == 1e-5  # YAML 1.1 reads 1e-5 (no dot) as a string
    assert config.data.count_weights == (1.0, 2.0, 0.0) and config.generate.guidance == (2.0,)  # lists -> tuples


# ----------------------------------------------------------------------------- one problem, one message

@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
    ("train.steps=2.5", "train.steps: expected an integer, got 2.5"),
    ("train.compile=1", "train.compile: expected true or false, got 1"),
    ("train.compile='yes'", "train.compile: expected true or false, got 'yes'"),
    ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
    ("train.lr=[0.1]", "train.lr: expected a finite number, got [0.1]"),
    ("model.image.mean=[0.5, 0.5]", "model.image.mean: expected a list of 3 finite numbers or null, got [0.5, 0.5]"),
    ("data.path=3", "data.path: expected a string or null, got 3"),
    ("model.image.timm_kwargs=[1]", "model.image.timm_kwargs: expected a mapping, got [1]"),
    ("train.steps=99999999999999999999", "train.steps: expected an integer"),
    ("model.image=5", "model.image: expected a mapping with keys name, image_size"),
])
def test_a_value_of_the_wrong_type_names_key_value_and_type(override, message):
    assert str(error_of(override)).startswith(message)


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
    ("train.steps=-3", "train.steps: must be >= 1, got -3"),
    ("train.warmup_steps=-1", "train.warmup_steps: must be >= 0, got -1"),
    ("train.ema_decay=1", "train.ema_decay: must be in [0, 1), got 1"),
    ("generate.model.condition_dropout=1.5", "generate.model.condition_dropout: must be in [0, 1], got 1.5"),
    ("model.image.std=[0.2, 0, 0.2]", "model.image.std: every entry must be > 0, got [0.2, 0, 0.2]"),
    ("generate.guidance=[]", "generate.guidance: must not be empty, got []"),
    ("generate.guidance_interval=[0.7, 0.2]", "generate.guidance_interval: must be [lo, hi] with 0 <= lo <= hi <= 1"),
    ("data.count_weights=[0, 0, 0]", "data.count_weights: must be >= 0 with at least one > 0"),
    ("train.device=gpu", "train.device: must be auto | cpu | cuda | cuda:N | mps, got 'gpu'"),
    ("name=..", "name: must be a folder name"),
])
def test_a_value_out_of_range_says_what_is_allowed(override, message):
    assert str(error_of(override)).startswith(message)


@pytest.mark.parametrize("override, message", [
    ("data.dataset=shapez", "data.dataset: choose from shapes | digits | fashion | files | shards, got 'shapez' "
                            "(did you mean 'shapes'?)"),
    ("train.loss=clip", "train.loss: choose from infonce | siglip | pairwise, got 'clip'"),
    ("train.accum_mode=cache", "train.accum_mode: choose from plain | gradcache"),
    ("train.precision=fp16", "train.precision: choose from auto | fp32 | bf16"),
    ("train.siglip_exchange=ring", "train.siglip_exchange: choose from gather | neighbour"),
    ("model.image.pool=max", "model.image.pool: choose from attn | avg | timm"),
    ("model.text.pool=max", "model.text.pool: choose from mean | cls"),
    ("finetune.fusion=add", "finetune.fusion: choose from concat | sum | gated | cross"),
    ("generate.model.beta_schedule=cosine", "generate.model.beta_schedule: choose from squaredcos_cap_v2"),
    ("generate.model.prediction_type=x0", "generate.model.prediction_type: choose from epsilon | v_prediction"),
])
def test_a_name_outside_its_choices_lists_them(override, message):
    assert str(error_of(override)).startswith(message)


@pytest.mark.parametrize("overrides, message", [
    (["model.text.num_heads=3"], "model.text.num_heads: must divide hidden_size (128), got 3"),
    (["train.accum_steps=3"], "train.batch_size: must be a multiple of accum_steps (3), got 128"),
    (["caption.model.heads=3"], "caption.model.heads: must divide width (256), got 3"),
    (["finetune.cross_heads=3"], "finetune.cross_heads: must divide cross_width (128), got 3"),
    (["generate.model.attention_levels=[true]"], "generate.model.attention_levels: must have one entry per"),
    (["generate.model.norm_groups=5"], "generate.model.norm_groups: must divide every entry of block_channels"),
    (["generate.model.image_size=30"], "generate.model.image_size: must be a multiple of 4 for a 3-level UNet"),
    (["generate.model.train_timesteps=10"], "generate.sampling_steps: must be at most model.train_timesteps (10)"),
    (["data.dataset=files"], "data.path: must be set for dataset files"),
    (["data.image_size=16"], "data.image_size: must be in [32, 224] for dataset shapes, got 16"),
])
def test_rules_between_fields(overrides, message):
    assert str(error_of(*overrides)).startswith(message)


def test_unknown_keys_suggest_the_nearest_and_list_the_valid_ones():
    message = str(error_of("train.stepz=3"))
    assert message.startswith("train.stepz: unknown config key (did you mean 'steps'? valid keys in train: ")
    assert "warmup_steps" in message
    assert str(error_of("trian.steps=3")).startswith("trian: unknown config key (did you mean 'train'?")
    assert "is a value, not a config section" in str(error_of("train.steps.max=3"))
    assert "must look like section.key=value" in str(error_of("train.steps"))


def test_an_override_value_that_is_not_yaml_names_its_key():
    message = str(error_of("train.steps=[1,"))
    assert message.startswith("train.steps: cannot read the value as YAML") and message.endswith("got '[1,'")


# ----------------------------------------------------------------------------- many problems, one error

def test_every_problem_is_listed_in_one_error(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("train: {steps: 0, learning_rate: 0.1, loss: info}\n"
                    "model: {image: {image_size: -1}, text: {num_heads: 3}}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ["train.batch_size=abc", "data.dataset=shapez"])
    problems = error.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "train.learning_rate", "train.steps", "train.loss", "train.batch_size", "model.image.image_size",
        "model.text.num_heads", "data.dataset"]
    message = str(error.value)
    assert message.startswith(f"{path}: 7 problems: train.learning_rate: unknown config key")
    assert "\n" not in message and all(p in message for p in problems)


def test_problems_of_overrides_alone_do_not_blame_the_file():
    message = str(error_of("train.steps=abc", "train.batch_size=0", "data.dataset=shapez"))
    assert message.startswith("3 config problems: data.dataset: choose from")  # sections in file order
    assert "train.steps: expected an integer, got 'abc'; train.batch_size: must be >= 1, got 0" in message


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "name: x\ntrain:\n  steps: 3\n   batch_size: 4\n", "bad.yaml line 4, column 14: mapping values are not "
                                                                     "allowed here"),
    ("bad.yaml", "train: {steps: [1, 2}\n", "bad.yaml line 1"),
    ("bad.json", '{"train": {"steps": 3,}}', "bad.json line 1: Expecting property name"),
    ("list.yaml", "- train\n- model\n", "list.yaml: expected a mapping of config sections (name, model, data"),
    ("text.yaml", "just some words\n", "text.yaml: expected a mapping of config sections"),
])
def test_a_config_file_that_does_not_parse_names_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{tmp_path}/{message}")


def test_a_folder_or_binary_file_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)
    (tmp_path / "x.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="named configs: .*tiny-shapes"):
        load_config("no-such-config")


def test_a_value_checked_in_a_saved_model_config_names_the_file():
    data = json.loads(json.dumps(dataclasses.asdict(C.ModelConfig())))
    data["image"]["image_size"] = "64px"
    with pytest.raises(ConfigError) as error:
        from_dict(C.ModelConfig, data, where="runs/x/model/config.json")
    assert str(error.value) == "runs/x/model/config.json: image.image_size: expected an integer or null, got '64px'"


# ----------------------------------------------------------------------------- just before a run

def test_the_moved_finetune_task_key_sets_train_task():
    """finetune.task was the fine-tuning task before train.task named every run's kind: an override of it
    lands on train.task, and a file's finetune.task is dropped (a run folder's model says its task)."""
    from vlpt.tasks import task_names

    assert load_config("tiny-shapes", ["finetune.task=vqa"]).train.task == "vqa"
    with pytest.raises(ConfigError, match=r"train.task: choose from contrastive \| caption .*got 'segment'"):
        validate_config(load_config("tiny-shapes", ["finetune.task=segment"]), task_names())


def test_validate_config_checks_task_names_and_paths(tmp_path):
    config = load_config("tiny-shapes", ["train.task=contrastiv"])
    validate_config(config)  # no task names given: not checked
    with pytest.raises(ConfigError, match=r"train.task: choose from contrastive \| generate, got 'contrastiv' "
                                          r"\(did you mean 'contrastive'\?\)"):
        validate_config(config, ["contrastive", "generate"])
    config = load_config("tiny-shapes", ["data.dataset=files", f"data.path={tmp_path / 'missing'}",
                                         f"generate.from_run={tmp_path / 'nowhere'}"])  # loading checks no paths
    with pytest.raises(ConfigError) as error:
        validate_config(config, check_paths=True)
    assert [p.split(":")[0] for p in error.value.problems] == ["data.path", "generate.from_run"]
    assert "must be an existing image folder" in error.value.problems[0]
    validate_config(load_config("tiny-shapes", ["data.dataset=files", f"data.path={tmp_path}"]), check_paths=True)
    validate_config(load_config("tiny-shapes", ["data.dataset=shards", f"data.path={tmp_path}/*.tar"]),
                    check_paths=True)  # a pattern is left to the shard reader


def test_validate_config_catches_values_set_in_code():
    config = RunConfig()
    config.train.steps = 0
    config.data.dataset = "Shapes"
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert error.value.problems == ["data.dataset: choose from shapes | digits | fashion | files | shards, got 'Shapes' "
                                    "(did you mean 'shapes'?)", "train.steps: must be >= 1, got 0"]
    with pytest.raises(ConfigError, match="train.steps"):
        apply_overrides(config, ["data.dataset=shapes"])


# ----------------------------------------------------------------------------- the names match the code

def test_choice_lists_match_what_the_code_accepts():
    from diffusers import DDIMScheduler, DDPMScheduler

    from vlpt import losses
    from vlpt.models import fusion, generator, image_towers, task_model, text_towers
    from vlpt.train.trainer import autocast_context

    assert set(C.LOSSES) == set(losses.LOSSES) and set(C.SIGLIP_EXCHANGES) == set(losses.SIGLIP_EXCHANGES)
    assert fusion.FUSION_METHODS is C.FUSION_METHODS and task_model.TASKS is C.FINETUNE_TASKS
    assert image_towers.POOLS is C.IMAGE_POOLS and text_towers.POOLS is C.TEXT_POOLS
    assert generator.PREDICTION_TYPES is C.PREDICTION_TYPES
    for precision in C.PRECISIONS:
        autocast_context(torch.device("cpu"), precision)
    for schedule in C.BETA_SCHEDULES:
        DDPMScheduler(beta_schedule=schedule)
        DDIMScheduler(beta_schedule=schedule)
