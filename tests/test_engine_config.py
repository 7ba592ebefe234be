"""Run configuration: defaults = demo, paper configs, unknown keys with suggestions, value coercion."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ahbf.engine.config import (SECTIONS, ConfigError, RunConfig, build_config, config_from_dict, field_docs,
                                parse_override, set_value)

from ahbf.engine.resolve import method_defaults

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_builtin_default_is_the_digits_demo_config():
    assert build_config([str(CONFIGS / "digits_demo.yaml")]) == RunConfig()
    cfg = RunConfig()
    assert (cfg.data.dataset, cfg.model.method, cfg.model.num_branches) == ("digits", "ahbf", 4)


GOLDEN = json.loads((Path(__file__).parent / "assets" / "configs_golden.json").read_text())


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_resolves_to_its_recorded_values(path):
    """Each overlay (recipe + a few keys) resolves to every value its full 79-line file had
    (tests/assets/configs_golden.json: the files as they were before they became overlays)."""
    cfg = method_defaults(build_config([str(path)]))
    golden = method_defaults(config_from_dict(GOLDEN[path.name]))
    assert cfg.to_dict() == golden.to_dict()
    assert path.stem.startswith(cfg.data.dataset)
    assert cfg.train.output == f"runs/{path.stem}" or path.stem == "digits_demo"


def test_every_config_is_in_the_golden_file():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(GOLDEN)


def test_unknown_recipe_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: cifar1000\nmodel:\n  arch: resnet8\n")
    with pytest.raises(ConfigError, match=r"unknown recipe 'cifar1000'; choose from cifar10, cifar100, folder, imagenet"):
        build_config([str(bad)])


@pytest.mark.parametrize("name", ["cifar10_resnet32_ahbf", "cifar100_resnet110_ahbf", "cifar100_resnet32_dml",
                                  "cifar10_resnet110_one", "cifar100_resnet32_baseline"])
def test_cifar_configs_follow_spec4(name):
    c = method_defaults(build_config([str(CONFIGS / f"{name}.yaml")]))
    assert (c.train.epochs, c.optim.lr, c.optim.momentum, c.optim.nesterov, c.optim.weight_decay) == (300, 0.1, 0.9, True, 5e-4)
    assert (c.schedule.name, c.schedule.milestones, c.schedule.gamma, c.data.batch_size) == ("multistep", (150, 225), 0.1, 128)
    assert c.objective.T == 3.0
    if c.model.method == "ahbf":
        assert (c.objective.kd_weight, c.objective.rampup, c.objective.ramp, c.model.aux) == (1.5, 240, "sigmoid", 4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_imagenet_configs_follow_spec4(arch):
    for method in ("ahbf", "baseline"):
        c = method_defaults(build_config([str(CONFIGS / f"imagenet_{arch}_{method}.yaml")]))
        assert (c.data.batch_size, c.optim.lr, c.optim.weight_decay, c.train.epochs) == (256, 0.1, 1e-4, 90)
        assert (c.schedule.name, c.schedule.milestones) == ("multistep", (30, 60))
        assert c.model.aux == (2 if method == "ahbf" else 0)


def test_every_field_has_a_docstring():
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{section}: fields without a docstring: {missing}"


@pytest.mark.parametrize("key, suggestion", [("optim.lrr", "optim.lr"), ("lr", "optim.lr"),
                                             ("train.epoch", "train.epochs"), ("objective.lamda1", "objective.lambda1"),
                                             ("optimizer.lr", "optim.lr"), ("model.archh", "model.arch")])
def test_unknown_key_names_it_and_suggests_the_nearest(key, suggestion):
    with pytest.raises(ConfigError) as err:
        set_value(RunConfig(), key, 1)
    assert str(err.value) == f"unknown config key '{key}'; did you mean '{suggestion}'?"


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.05\n  weight_decy: 1e-4\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.weight_decy'; did you mean 'optim.weight_decay'"):
        build_config([str(path)])


def test_values_are_coerced_and_checked():
    cfg = RunConfig()
    for text in ("schedule.milestones=[10, 20]", "schedule.milestones=10,20"):
        assert set_value(cfg, *parse_override(text)).schedule.milestones == (10, 20)
    cfg = set_value(cfg, *parse_override("optim.weight_decay=1e-4"))  # YAML reads 1e-4 as a string
    assert cfg.optim.weight_decay == 1e-4
    for text, expected in (("true", True), ("'false'", False), ("auto", "auto")):  # a bool, or auto
        cfg = set_value(cfg, *parse_override(f"objective.detach_teacher={text}"))
        assert cfg.objective.detach_teacher is expected or cfg.objective.detach_teacher == expected == "auto"
    with pytest.raises(ConfigError, match="objective.detach_teacher: unknown value 'maybe'; choose from auto, true, false"):
        build_config(overrides=[("objective.detach_teacher", "maybe")])
    cfg = set_value(cfg, "train.deterministic", "yes")
    assert cfg.train.deterministic is True
    with pytest.raises(ConfigError, match="'train.epochs': expected int, got 'many'"):
        set_value(cfg, "train.epochs", "many")
    with pytest.raises(ConfigError, match="'train.epochs': expected int, got 2.5"):
        set_value(cfg, "train.epochs", 2.5)
    with pytest.raises(ConfigError, match="model.method: unknown value 'ahfb'; did you mean 'ahbf'"):
        build_config(overrides=[("model.method", "ahfb")])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("epochs")


@pytest.mark.parametrize("doc", ["docs/training.md"])
def test_docs_config_reference_is_current(doc):
    from ahbf.engine.config import reference_markdown

    text = (CONFIGS.parent / doc).read_text()
    table = text.split("<!-- config-reference:start -->\n", 1)[1].split("\n<!-- config-reference:end -->", 1)[0]
    assert table == reference_markdown(), f"regenerate the table in {doc} from reference_markdown()"


@pytest.mark.parametrize("key,value,message", [
    ("objective.T", 0, "objective.T must be > 0"),
    ("data.batch_size", 0, "data.batch_size must be >= 2"),
    ("data.eval_batch_size", 0, "data.eval_batch_size must be >= 1"),
    ("schedule.gamma", -0.1, "schedule.gamma must be > 0"),
    ("schedule.warmup_epochs", -1, "schedule.warmup_epochs must be >= 0"),
    ("optim.lr", 0, "optim.lr must be > 0"),
])
def test_out_of_range_values_are_one_line_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=[(key, value)])


@pytest.mark.parametrize("value", ["10,20", "10 20", ["10,20"], ["10", "20"], [10, 20]])
def test_milestones_accept_commas_and_spaces(value):
    assert build_config(overrides=[("schedule.milestones", value)]).schedule.milestones == (10, 20)


def test_configs_are_frozen_and_resolving_returns_a_new_one(tmp_path):
    """A config never changes: ``build_run`` resolves into a new one (``Run.cfg``, no ``auto`` left)."""
    import dataclasses

    import torch

    from ahbf.engine.config import TrainConfig
    from ahbf.engine.distributed import DistEnv
    from ahbf.engine.run import build_run

    cfg = build_config(overrides=[("train.output", str(tmp_path / "run")), ("train.device", "cpu")])
    before = cfg.to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = TrainConfig()
    assert cfg.replace(train={"epochs": 3}).train.epochs == 3 and cfg.train.epochs == 30
    run = build_run(cfg, DistEnv(0, 0, 1, torch.device("cpu")))
    try:
        assert cfg.to_dict() == before  # the caller's config is untouched
        values = [v for section in run.cfg.to_dict().values() for v in section.values()]
        assert "auto" not in values and cfg.model.aux == "auto" and run.cfg.model.aux == 4
        assert (run.cfg.objective.kd_weight, run.cfg.optim.impl, run.cfg.train.output) == (1.5, "fused", str(tmp_path / "run"))
    finally:
        run.close()
