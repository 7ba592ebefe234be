"""A method of one's own, from outside the package (issue 25): examples/my_method.py, the file that
docs/methods.md shows, is checked in float64 against a plain-PyTorch transcription of its loss, and trains,
resumes bitwise, evaluates and exports through the command lines in fresh processes that import it from
the path the config records."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ahbf.engine.checkpoint import load_checkpoint
from ahbf.engine.config import ConfigError, ObjectiveConfig, build_config
from ahbf.engine.resolve import resolve_model, resolve_objective
from ahbf.engine.task import OKDTask
from ahbf.kernels import okd_loss
from ahbf.methods import METHODS, build_graph, get_method
from ahbf.models import create_model, create_plain
from tests.test_methods import check_fused

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PATH = "my_method:FEATURE_GATED"
B, K = 6, 11


@pytest.fixture(scope="module")
def method():
    sys.path.insert(0, str(EXAMPLES))  # what PYTHONPATH=examples does for ahbf-train
    try:
        yield get_method(PATH)
    finally:
        sys.path.remove(str(EXAMPLES))


def hand_loss(z, s, y, T, w):
    """The example's loss as its docstring writes it, without the graph: e = sum_j softmax(s)_j z_j;
    sum_i CE(z_i) + CE(e) + w * sum_i T^2 KL(softmax(e / T) || softmax(z_i / T)), e detached in the KLs."""
    g = torch.softmax(s, dim=-1)
    e = sum(g[:, j:j + 1] * z[j] for j in range(len(z)))
    q = F.softmax(e.detach() / T, dim=-1)
    kl = sum(T * T * (q * (q.log() - F.log_softmax(zi / T, dim=-1))).sum(-1).mean() for zi in z)
    return sum(F.cross_entropy(zi, y) for zi in z) + F.cross_entropy(e, y) + w * kl


def test_docs_show_the_tested_example_file():
    text = (ROOT / "docs" / "methods.md").read_text()
    shown = text.split("<!-- example:start -->\n```python\n", 1)[1].split("```\n<!-- example:end -->", 1)[0]
    assert shown == (EXAMPLES / "my_method.py").read_text(), "docs/methods.md: paste examples/my_method.py again"


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_objective_matches_a_plain_pytorch_transcription_in_float64(method, backend):
    torch.manual_seed(0)
    M, T, w = 3, 3.0, 0.7
    graph = build_graph(PATH, M, resolve_objective(ObjectiveConfig(), PATH))
    z = [(torch.randn(B, K, dtype=torch.float64) * 3).requires_grad_() for _ in range(M)]
    s = [torch.randn(B, M, dtype=torch.float64, requires_grad=True)]
    y = torch.randint(0, K, (B,))
    loss, _ = okd_loss(z, s, y, graph, T, w, backend=backend)
    ref = hand_loss(z, s[0], y, T, w)
    assert abs(loss.item() - ref.item()) < 1e-10, (loss.item(), ref.item())
    for a, b in zip(torch.autograd.grad(loss, z + s), torch.autograd.grad(ref, z + s)):
        assert (a - b).abs().max().item() < 1e-10


def test_the_fused_triton_kernel_serves_its_graph(method):
    """Nothing in the kernel knows the method: its graph is encoded like a built-in's (interpreted on a CPU)."""
    check_fused(build_graph(PATH, 3), "triton")


def test_the_record_drives_model_defaults_and_task(method):
    assert method.name == "feature_gated" and "feature_gated" not in METHODS  # not a built-in
    cfg = build_config(overrides=[("model.method", PATH), ("model.num_branches", 3)])
    model_cfg, objective = resolve_model(cfg.model), resolve_objective(cfg.objective, PATH)
    assert model_cfg.aux == 0 and (objective.ramp, objective.detach_teacher) == ("consistency", True)
    torch.manual_seed(0)
    model = create_model("resnet8", PATH, K, 3)
    assert model.gate.fc.in_features == 3 * 64 and list(model.part_names) == ["gate"]
    task = OKDTask(model, build_graph(PATH, 3, objective), objective)
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    assert torch.isfinite(task(x, y)["loss"])
    assert task.node_names == ["branch0", "branch1", "branch2", "ensemble"] and len(task.predict(x)) == 4


def test_bad_method_paths_are_one_line_config_errors(method):
    for value, match in [("no_such_module:X", "cannot import 'no_such_module'"),
                         ("my_method:NOPE", "module 'my_method' has no attribute 'NOPE'"),
                         ("my_method:parts", "expected an ahbf.methods.Method, got function")]:
        with pytest.raises(ConfigError, match=f"model.method: method '{value}': {match}") as err:
            build_config(overrides=[("model.method", value)])
        assert "\n" not in str(err.value)


TINY = ["--dataset", "synthetic", "data.synthetic_samples=48", "--image-size", "8", "--arch", "resnet8",
        "-b", "16", "data.eval_batch_size=32", "--epochs", "2", "--precision", "fp32", "--objective-backend", "eager",
        "--deterministic", "--no-progress", "train.tensorboard=false", "train.save_every=1", "--num-branches", "3",
        "--warmup-epochs", "0.5", "--lr", "0.05", "objective.rampup=2", "--threads", "1", "--method", PATH]


def run(prog: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command line in a fresh process outside the checkout, the example's folder on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(ROOT)])}
    code = f"import sys; from ahbf.engine.cli import {prog}_main as m; sys.exit(m(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_trains_resumes_bitwise_evaluates_and_exports_from_outside_the_package(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = run("train", *TINY, "-o", str(full), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ensemble" in proc.stdout and f"method: {PATH}" in (full / "config.yaml").read_text()
    proc = run("train", *TINY, "-o", str(resumed), "--resume", str(full / "epoch_1.pt"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_checkpoint(str(full / "last.pt")), load_checkpoint(str(resumed / "last.pt"))
    assert a["spec"]["method"] == PATH and a["step"] == b["step"] > 0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    proc = run("eval", str(full / "last.pt"), cwd=tmp_path)  # the method comes from the checkpoint's config
    assert proc.returncode == 0 and "ensemble" in proc.stdout, proc.stderr[-3000:]
    proc = run("export", str(full / "last.pt"), "-o", str(tmp_path / "target.pt"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = create_plain("resnet8", a["spec"]["num_classes"])
    plain.load_state_dict(torch.load(tmp_path / "target.pt", weights_only=True), strict=True)
