"""``train.cuda_graph``: the whole training step (forward, fused objective, backward, optimiser step) replayed
as one CUDA graph.

:class:`GraphedStep` wraps ``Run.eager_step`` (the step ``Trainer`` runs otherwise) without changing it:

- **static inputs**: each batch is copied into two buffers the graph reads (``x``, ``y``);
- **scalars as device tensors, updated in place**: the learning rate of every parameter group (read by the
  fused SGD kernel from device memory; ``optim.set_lr`` fills it) and the KD ramp ``kd_scale``
  (``OKDTask.kd_on_device``: ``set_epoch`` fills it, the objective reads it through a pointer);
- **warm-up on a side stream**: the first ``WARMUP`` steps run eagerly there (cuDNN autotuning, the
  objective's plans and reused buffers, the optimiser's momentum buffers: everything allocated before the
  capture), then one step is captured with ``torch.cuda.graph`` and every later step is one replay. The
  captured step's results (loss terms) are static tensors overwritten by the next replay;
- **the same code on CPU**: without CUDA the step runs exactly so but uncaptured (static buffers, device
  scalars), which is what the CPU tests check against the plain step.

Where capture is impossible the plain eager step runs, with one note saying why (:func:`capture_blockers`):
fp16 (the optimiser under loss scaling is foreach SGD, whose skipped-step decision reads the scaler's
found-inf flag on the host; fused SGD is refused there, ``optim.py``), several processes (DDP's gradient
all-reduce runs from autograd hooks, and SyncBatchNorm's collectives with it: not captured), an optimiser
that is not fused SGD (foreach / loop read a tensor learning rate with ``.item()``), and
``train.compile_mode=reduce-overhead`` (its own CUDA graphs). A batch of another shape (the last partial
batch, DALI's included) runs the eager step, noted once.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

from ..kernels import plan

WARMUP = 2  # eager steps on the side stream before the capture


def capture_blockers(device: torch.device, precision: str, world_size: int, optimizer: torch.optim.Optimizer,
                     compile_mode: str) -> list[str]:
    """Why the step cannot be captured here (empty: it can)."""
    why = []
    if device.type != "cuda":
        why.append(f"{device.type}: no CUDA graphs (the step runs uncaptured, with its static buffers)")
    if precision == "fp16":
        why.append("fp16: the loss-scaled optimiser step decides on the host whether to skip")
    if world_size > 1:
        why.append("several processes: DDP's gradient all-reduce (and SyncBatchNorm) is not captured")
    if not optimizer.defaults.get("fused"):
        why.append("the optimiser is not fused SGD (foreach / loop read a tensor lr on the host)")
    if compile_mode == "reduce-overhead":
        why.append("compile_mode=reduce-overhead captures CUDA graphs of its own")
    return why


def lr_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Every parameter group's ``lr`` as a 0-dim tensor on ``device`` (kept if it is one already): fp32 on
    CUDA (what the fused SGD kernel reads), fp64 on CPU (the CPU kernel reads it as a double, so the step
    equals one with a Python-float lr bitwise)."""
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not (isinstance(lr, Tensor) and lr.device == device and lr.dtype == dtype):
            group["lr"] = torch.tensor(float(lr), dtype=dtype, device=device)


class GraphedStep:
    """``step(x, y) -> loss terms`` for ``train.cuda_graph`` (module docstring). ``step``: the eager step
    (``Run.eager_step``); ``capture``: record a CUDA graph after the warm-up (False: the same static-buffer
    step, uncaptured); ``note``: where the one-line notes go."""

    def __init__(self, step: Callable[[Tensor, Tensor], dict[str, Tensor]], device: torch.device, capture: bool,
                 note: Callable[[str], None] = print, reset: Callable[[], None] = lambda: None):
        self.step, self.device, self.capture, self.note, self.reset = step, device, capture, note, reset
        self.pinned: list = []  # the objective's plans at capture: their buffers live as long as the graph
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.graph = None
        self.terms: dict[str, Tensor] = {}
        self.warm = 0
        self.stream = torch.cuda.Stream(device) if capture else None
        self.noted_shape = False

    def __call__(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.x is None:
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        elif x.shape != self.x.shape or y.shape != self.y.shape or x.dtype != self.x.dtype:
            if not self.noted_shape:
                self.note(f"train.cuda_graph: a batch of shape {tuple(x.shape)} (the graph's: {tuple(self.x.shape)}) "
                          "runs the eager step")
                self.noted_shape = True
            return self.step(x, y)
        self.x.copy_(x)
        self.y.copy_(y)
        if self.graph is not None:
            self.graph.replay()
            return self.terms
        if not self.capture or self.warm < WARMUP:
            self.warm += 1
            with self._side_stream():
                return self.step(self.x, self.y)
        try:
            graph, terms, pinned = record(lambda: self.step(self.x, self.y), self.stream)
        except RuntimeError as err:  # an operation that cannot be captured: best effort, the step runs eagerly
            self.note(f"train.cuda_graph: capture failed ({str(err).splitlines()[0]}): the eager step runs")
            self.capture = False
            torch.cuda.synchronize(self.device)
            self.reset()  # gradients the failed capture may have left in the graph's memory pool
            return self.step(self.x, self.y)
        self.graph, self.terms, self.pinned = graph, {k: v.detach() for k, v in terms.items()}, pinned  # static outputs
        graph.replay()
        return self.terms

    def _side_stream(self):
        if self.stream is None:
            return contextlib.nullcontext()
        return side_stream(self.stream, self.device)


def record(fn: Callable[[], object], stream: torch.cuda.Stream):
    """``fn()`` captured as a CUDA graph on ``stream`` (after its warm-up there): ``(graph, fn's outputs, pinned)``,
    ``pinned`` the objective's plans the graph writes to (hold them as long as the graph: a full plan cache is
    cleared, and a replay must keep writing to live buffers)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph, out, plan.pinned()


@contextlib.contextmanager
def side_stream(stream: torch.cuda.Stream, device: torch.device):
    """Run on ``stream`` once the current stream's work is done, then make the current stream wait for it
    (warm-up before a capture)."""
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            yield
    finally:  # also after an error: later work on the current stream must not overtake the side stream's
        torch.cuda.current_stream(device).wait_stream(stream)
