"""Precise BN: after ``update_bn_stats`` every BatchNorm's running mean / var are the exact (float64) mean and
unbiased variance of all the inputs it saw over the batch stream; nothing else changes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ahbf.engine.checkpoint import load_checkpoint
from ahbf.engine.precise_bn import batch_stats_top1, batchnorms, hint, update_bn_stats


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 5 * 5, 7),
                         nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 4)).double()


def stream(sizes=(6, 9, 1, 4)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 7, 7, generator=g, dtype=torch.float64) * 3 + 2, torch.randint(0, 4, (n,), generator=g))
            for n in sizes]


def inputs_of_each_bn(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """The reference: every BN's inputs over the stream (train mode, 1-sample batches skipped), concatenated."""
    model, seen = copy.deepcopy(model).train(), {}
    for name, m in batchnorms(model).items():
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for x, _ in batches:
            if len(x) > 1:
                model(x)
    return {n: torch.cat([t.transpose(0, 1).reshape(t.size(1), -1) for t in v], 1) for n, v in seen.items()}


def test_running_stats_are_the_exact_statistics_of_the_stream():
    model, batches = net().eval(), stream()
    for m in batchnorms(model).values():  # stale statistics, as after a short run
        m.running_mean.fill_(5.0)
        m.running_var.fill_(0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = inputs_of_each_bn(model, batches)
    assert update_bn_stats(model, iter(batches), 10) == 3  # the 1-sample batch is skipped
    assert not model.training and not any(m.training for m in model.modules())
    for name, m in batchnorms(model).items():
        x = expected[name]
        torch.testing.assert_close(m.running_mean, x.mean(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, x.var(1, unbiased=True), rtol=1e-12, atol=1e-12)
        assert m.momentum == 0.1
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"{n}.{b}" for n in ("1", "5") for b in ("running_mean", "running_var")}


def test_num_batches_limits_the_stream():
    model, batches = net(), stream()
    expected = inputs_of_each_bn(model, batches[:1])
    assert update_bn_stats(model, iter(batches), 1) == 1
    torch.testing.assert_close(model[1].running_mean, expected["1"].mean(1), rtol=1e-12, atol=1e-12)


def test_batch_stats_top1_leaves_the_model_as_it_was():
    model, batches = net().eval(), stream()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    top1 = batch_stats_top1(model, lambda x: [model(x)], batches)
    assert 0 <= top1 <= 100 and not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hint_only_when_batch_statistics_are_far_better():
    assert "--precise-bn 20" in hint(eval_top1=10.0, batch_top1=85.0)
    assert hint(eval_top1=80.0, batch_top1=85.0) == ""


def test_train_with_precise_bn(tmp_path, capsys):
    from ahbf.engine.cli import train_main

    args = ["--dataset", "synthetic", "data.synthetic_samples=64", "--image-size", "8", "--arch", "resnet8", "-b",
            "8", "--epochs", "1", "--precision", "fp32", "--objective-backend", "eager", "--no-progress",
            "train.tensorboard=false", "--threads", "1", "--device", "cpu", "-o", str(tmp_path)]
    assert train_main([*args, "--deterministic", "--precise-bn", "3"]) == 0
    out = capsys.readouterr().out
    assert "precise BN: running statistics of" in out and "3 training batches" in out
    assert train_main([*args, "--deterministic", "-o", str(tmp_path / "plain")]) == 0
    precise, plain = (load_checkpoint(str(p))["model"] for p in (tmp_path / "last.pt", tmp_path / "plain" / "last.pt"))
    stats = [k for k in plain if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(precise[k], plain[k]) for k in plain if k not in stats)  # only BN statistics
    assert all(not torch.equal(precise[k], plain[k]) for k in stats)


@pytest.mark.parametrize("value", ["-1"])
def test_negative_precise_bn_is_refused(value, capsys):
    from ahbf.engine.cli import train_main

    assert train_main(["--precise-bn", value, "--epochs", "1"]) == 2
    assert "train.precise_bn" in capsys.readouterr().err


def test_precise_bn_chooses_best_pt_with_the_statistics_it_holds(tmp_path, capsys):
    """Issue 23: with precise BN the val top-1 that chooses best.pt is measured after the re-estimate, so the chosen
    epoch's recorded val top-1 is exactly what ``ahbf-eval best.pt --split val`` reports, and every epoch's
    checkpoint holds re-estimated statistics (a 2-epoch run chose epoch 1 on stale statistics before)."""
    import json

    from ahbf.engine.cli import eval_main, train_main

    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "data.synthetic_samples=96", "--image-size", "8", "--arch", "resnet8", "-b",
            "8", "--epochs", "2", "--precision", "fp32", "--objective-backend", "eager", "--no-progress",
            "train.tensorboard=false", "--threads", "1", "--device", "cpu", "--precise-bn", "4", "-o", str(out),
            "train.save_every=1"]
    assert train_main(args) == 0
    assert "after every epoch, before val chooses best.pt" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    best = results["best"]
    assert eval_main([str(out / "best.pt"), "--split", "val", "--json", str(tmp_path / "val.json")]) == 0
    assert json.loads((tmp_path / "val.json").read_text())["nodes"]["branch0"]["top1"] == best["val_top1"]
    for epoch in (1, 2):  # each epoch's checkpoint: the statistics of its own weights on its next epoch's batches
        ckpt = load_checkpoint(str(out / f"epoch_{epoch}.pt"))
        history = ckpt["history"][-1]
        assert eval_main([str(out / f"epoch_{epoch}.pt"), "--split", "val", "--json", str(tmp_path / "e.json")]) == 0
        assert json.loads((tmp_path / "e.json").read_text())["nodes"]["branch0"]["top1"] == history["val_branch0_top1"]
