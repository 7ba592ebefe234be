"""Test helpers shared by all test files."""
from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, name: str = "") -> None:
    """Like torch.testing.assert_close, but says where and by how much, relative to the largest value."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values in result"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if (err > bound).any():
        idx = tuple(int(i) for i in torch.nonzero(err > bound)[0])
        raise AssertionError(f"{name}: {int((err > bound).sum())} of {err.numel()} elements differ; first at {idx}: "
                             f"{actual[idx].item():.8g} vs {expected[idx].item():.8g}; max abs err {err.max().item():.3g}")


def sgd_losses(model, x: torch.Tensor, y: torch.Tensor, graph, lr: float, steps: int = 8) -> list[float]:
    """The reference objective's loss at each of ``steps`` SGD (momentum 0.9) steps on one batch."""
    from ahbf.kernels import okd_objective_reference

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        out = model(x)
        loss, _ = okd_objective_reference(out.logits, out.scores, y, graph, T=3.0, kd_scale=0.75)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
