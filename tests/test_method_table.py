"""Issue 16: one record per method (ahbf/methods.py) is what every other part reads."""
from __future__ import annotations

from pathlib import Path

import pytest

from ahbf.engine.config import ConfigError, ObjectiveConfig, build_config
from ahbf.engine.resolve import resolve_model, resolve_objective
from ahbf.engine.config import ModelConfig
from ahbf.methods import METHODS, PEERS, PLAIN, build_graph, get_method, methods_markdown
from ahbf.models import PeerNet, create_model
from ahbf.methods.pcl import TemporalMeanNet

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_docs_embed_the_current_method_table():
    text = DOC.read_text()
    table = text.split("<!-- method-table:start -->\n", 1)[1].split("\n<!-- method-table:end -->", 1)[0]
    assert table == methods_markdown(), "docs/methods.md: regenerate the table with ahbf.methods.methods_markdown()"


def test_unknown_method_is_one_line_naming_every_valid_one():
    with pytest.raises(ValueError) as err:
        get_method("ahfb")
    msg = str(err.value)
    assert "\n" not in msg and "'ahfb'" in msg and all(name in msg for name in METHODS)
    with pytest.raises(ValueError, match="unknown method 'ahfb'"):
        build_graph("ahfb", 4)
    with pytest.raises(ValueError, match="unknown method 'ahfb'"):
        create_model("resnet8", "ahfb")
    with pytest.raises(ConfigError, match="model.method: unknown value 'ahfb'"):
        build_config(overrides=[("model.method", "ahfb")])


@pytest.mark.parametrize("name", list(METHODS))
def test_each_record_drives_model_graph_and_defaults(name):
    m = get_method(name)
    M = max(m.min_branches, 3)
    model = create_model("resnet8", name, 10, M)
    kind = PeerNet if m.model == PEERS else TemporalMeanNet if m.wrap is TemporalMeanNet else type(model)
    assert isinstance(model, kind)
    assert model.spec["num_branches"] == (1 if m.model == PLAIN else M)
    cfg = resolve_objective(ObjectiveConfig(), name)
    assert (cfg.ramp, cfg.detach_teacher, cfg.kd_weight) == (m.ramp, m.detach, m.kd_weight)
    graph = build_graph(name, model.spec["num_branches"], cfg)
    assert graph.name == name and build_graph(name, model.spec["num_branches"]) == graph
    assert resolve_model(ModelConfig(method=name, num_branches=M)).num_branches == model.spec["num_branches"]
    if m.model != PLAIN and m.min_branches > 2:
        with pytest.raises(ValueError, match=f">= {m.min_branches} for {name}"):
            create_model("resnet8", name, 10, m.min_branches - 1)
        with pytest.raises(ConfigError, match=f"model.num_branches must be >= {m.min_branches} for {name}"):
            build_config(overrides=[("model.method", name), ("model.num_branches", m.min_branches - 1)])


def test_families_come_from_the_record():
    for name, m in METHODS.items():
        if "vgg" in m.families:
            create_model("vgg16", name, 10, 2)
        else:
            with pytest.raises(ValueError, match=f"method '{name}' is built for the ResNets only; vgg16 takes"):
                create_model("vgg16", name, 10, 2)
