"""benchmarks/reproduce.py at a tiny size (so it never rots) and the diversity measure it reports."""
import json
import math
from pathlib import Path

import pytest
import torch

import reproduce as rep  # benchmarks/ is on the path (pytest.ini)
from ahbf.analysis import branch_diversity
from reproduce_report import paired, sign_test_p



# ---------------------------------------------------------------------------- the diversity measure

def test_diversity_identical_branches_is_zero():
    z = torch.randn(50, 10)
    d = branch_diversity([z, z.clone(), z.clone()], labels=z.argmax(-1))
    assert d["pairs"] == 3
    assert d["disagreement"] == 0.0
    assert abs(d["sym_kl"]) < 1e-6
    assert d["ensemble_top1"] == pytest.approx(100.0)


def test_diversity_hand_computed():
    # two samples, two classes; branch a: confident class 0 on both, branch b: class 0 then class 1
    a = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    d = branch_diversity([a, b], labels=torch.tensor([0, 1]))
    assert d["disagreement"] == pytest.approx(0.5)
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    q = p.flip(0)
    kl = (p * (p / q).log()).sum().item()  # KL(p||q) = KL(q||p) here by symmetry
    assert d["sym_kl"] == pytest.approx(kl / 2, rel=1e-5)  # sample 0 contributes 0, sample 1 contributes kl
    # mean softmax: sample 0 -> class 0 (right); sample 1 -> a tie broken to class 0 (wrong)
    assert d["ensemble_top1"] == pytest.approx(50.0)


def test_diversity_temperature_and_bad_input():
    z1, z2 = torch.randn(20, 5), torch.randn(20, 5)
    hot, cold = branch_diversity([z1, z2], T=1.0), branch_diversity([z1, z2], T=4.0)
    assert cold["sym_kl"] < hot["sym_kl"]  # softer distributions are closer
    assert cold["disagreement"] == hot["disagreement"]  # argmax does not depend on T
    assert math.isnan(branch_diversity([z1])["disagreement"])
    with pytest.raises(ValueError):
        branch_diversity([z1, torch.randn(20, 6)])
    with pytest.raises(ValueError):
        branch_diversity([])


# ---------------------------------------------------------------------------- statistics helpers

def test_sign_test_and_paired():
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 2) == 1.0
    d = paired({0: 90.0, 1: 92.0, 2: 91.0}, {0: 89.0, 1: 92.0, 2: 93.0, 7: 50.0})
    assert d["seeds"] == [0, 1, 2] and d["diffs"] == [1.0, 0.0, -2.0]
    assert (d["wins"], d["ties"], d["losses"]) == (1, 1, 1)
    assert d["mean"] == pytest.approx(-1 / 3)
    assert d["se"] == pytest.approx(torch.tensor([1.0, 0.0, -2.0]).std().item() / math.sqrt(3))


def test_low_data_split_is_stratified_and_seeded():
    y = torch.arange(100) % 10
    a, b, c = rep.low_data_split(y, 4, 0), rep.low_data_split(y, 4, 0), rep.low_data_split(y, 4, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == 40 and len(set(a.tolist())) == 40
    assert torch.bincount(y[a], minlength=10).tolist() == [4] * 10
    with pytest.raises(ValueError):
        rep.low_data_split(y, 11, 0)


# ---------------------------------------------------------------------------- the whole benchmark, tiny

def test_reproduce_tiny(tmp_path):
    p = rep.Protocol(seeds=[0, 1], epochs=1, per_class=3, image_size=8, batch_size=16, eval_batch_size=512)
    rep.reproduce(p, out_dir=str(tmp_path), name="tiny", work_dir=str(tmp_path / "work"),
                  command="pytest tiny", log=lambda *_: None)
    files = rep.output_files(str(tmp_path), "tiny")
    for path in files.values():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, path

    data = json.loads(Path(files["json"]).read_text())
    assert data["complete"] is True
    assert len(data["runs"]) == 16 and {(r["method"], r["seed"]) for r in data["runs"]} == {
        (m, s) for m in rep.METHODS for s in (0, 1)}
    # branches, then TAs / ensembles / targets (KDCL's label-built target is not evaluated; PCL: + head, EMA peers)
    nodes = {"baseline": 1, "dml": 4, "one": 5, "ahbf": 7, "cl_ilr": 8, "okddip": 8, "kdcl": 4, "pcl": 13}
    for r in data["runs"]:
        assert r["train_samples"] == 30 and r["test_samples"] == 360
        assert len(r["test"]) == nodes[r["method"]]
        assert list(r["test"])[0] == "branch0" and r["target_top1"] == r["test"]["branch0"]["top1"]
        for m in r["test"].values():
            assert 0.0 <= m["top1"] <= m["top5"] <= 100.0
        # the engine's final evaluation and the probe's last epoch saw the same weights and images
        assert r["curves"]["test_branch0_top1"][-1] == pytest.approx(r["target_top1"], abs=1e-6)
        assert r["curves"]["epoch"] == [1]
        if r["method"] == "baseline":
            assert r["disagreement"] is None and "div_disagreement" not in r["curves"]
        else:
            assert 0.0 <= r["disagreement"] <= 1.0 and r["sym_kl"] >= 0.0
            assert 0.0 <= r["ensemble_top1"] <= 100.0
        # same protocol for every method: only the model / graph differ
        cfg = r["config"]
        assert (cfg["train"]["epochs"], cfg["data"]["batch_size"], cfg["optim"]["lr"]) == (1, 16, p.lr)
        assert cfg["model"]["arch"] == "resnet8" and cfg["train"]["seed"] == r["seed"]

    s = data["summary"]
    assert list(s["methods"]) == list(rep.METHODS)
    for m in s["methods"].values():
        mean, sd = m["target_top1"]
        assert m["n"] == 2 and 0.0 <= mean <= 100.0 and sd >= 0.0
        assert mean == pytest.approx(sum(m["per_seed"].values()) / 2)
    assert set(s["methods"]["ahbf"]["nodes"]) == {"branch0", "branch1", "branch2", "branch3", "ta0", "ta1", "ta2"}
    others = set(rep.METHODS) - {"ahbf"}
    assert set(s["paired"]) == others and set(s["paired_disagreement"]) == others - {"baseline"}
    gain = s["methods"]["dml"]["ensemble_gain"][0]
    assert -100.0 <= gain <= 100.0 and math.isnan(s["methods"]["baseline"]["ensemble_gain"][0])
    for d in s["paired"].values():
        assert len(d["diffs"]) == 2 and d["wins"] + d["ties"] + d["losses"] == 2 and 0.0 < d["sign_p"] <= 1.0

    md = Path(files["md"]).read_text()
    assert "Command: `pytest tiny`" in md
    for label in ("Baseline", "DML", "ONE", "CL-ILR", "OKDDip", "KDCL", "PCL", "AHBF", "ta2", "ema_branch0",
                  "Paired comparison", "disagreement"):
        assert label in md
    assert md.count("\n| 0 |") == 1 and md.count("\n| 1 |") == 1  # the per-seed table

    # --replot rewrites the markdown / figures from the JSON: same runs, same numbers
    before = md
    Path(files["md"]).unlink()
    rep.replot(str(tmp_path), "tiny")
    after = Path(files["md"]).read_text()
    assert "--replot" in after and after.split("\n", 3)[3] == before.split("\n", 3)[3]
    assert json.loads(Path(files["json"]).read_text())["runs"] == data["runs"]

    # --resume with the same protocol reuses both seeds' runs and trains nothing
    again = rep.reproduce(p, out_dir=str(tmp_path), name="tiny", work_dir=str(tmp_path / "work"), resume=True,
                          plots=False, command="pytest tiny", log=lambda *_: None)
    assert [r["wall_s"] for r in again["runs"]] == [r["wall_s"] for r in data["runs"]]
