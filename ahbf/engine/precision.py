"""Mixed precision: one object owns autocast, loss scaling, backward, unscale, clipping and the step."""
from __future__ import annotations

import re
from typing import ContextManager, Iterable

import torch
from torch import Tensor, nn

from .config import ConfigError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": None}
"""each ``train.precision``'s autocast dtype (None: no autocast)"""


def param_dtype(precision: str) -> torch.dtype:
    """The weights' and the images' dtype: float64 for ``fp64`` (exactness tests, numerical debugging), else
    float32 (bf16 / fp16 are autocast over float32 weights)."""
    return torch.float64 if precision == "fp64" else torch.float32


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (the ``avx512_bf16`` or ``amx_bf16`` flag of /proc/cpuinfo). Without
    it bf16 autocast is emulated: on the AVX2-only AMD EPYC of 2026-12-04 a 3x3 convolution ran 10x slower in
    bf16 than in fp32 and the demo trained at 35 img/s against 400 (measured)."""
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"\b(avx512_bf16|amx_bf16)\b", f.read()) is not None
    except OSError:  # not Linux: no cheap way to know, and fp32 is never the slow choice
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16, AMX), fp32 on other
    CPUs, fp16 (with loss scaling) on older GPUs. ``fp64`` is never chosen: it is asked for."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_has_bf16() else "fp32"
        return "bf16"
    if precision not in DTYPES:
        raise ConfigError(f"train.precision: unknown value '{precision}'; choose from auto, {', '.join(DTYPES)}")
    return precision


def check_cpu_bf16_convs(model: nn.Module, image_size: int, device: torch.device, precision: str, arch: str) -> None:
    """``ConfigError`` when bf16 on a CPU would train a strided, padded convolution on 1 x 1 feature maps: oneDNN
    (torch 2.14.1, AVX512-BF16 AMD EPYC) returns garbage in that layer's weight gradient (relative errors up to
    1e37 against float64, measured; fp32 and 2 x 2 maps are exact), so the run diverges or trains on noise.
    An ImageNet ResNet on 16 px images has such layers (layer4's first conv). One eval-mode forward of one image."""
    if device.type != "cpu" or precision != "bf16" or not image_size:
        return
    hit: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: hit.append(name) if args[0].shape[-2:] == (1, 1)
                                         else None)
             for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and max(m.stride) > 1 and max(m.kernel_size) > 1 and max(m.padding) > 0]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    if hit:
        more = f" and {len(hit) - 1} more" if len(hit) > 1 else ""
        raise ConfigError(f"{arch} at {image_size} px: {hit[0]}{more} is a strided convolution on 1x1 feature maps, "
                          "whose bf16 weight gradient is wrong on CPUs (oneDNN); use a larger --image-size (e.g. "
                          f"{4 * image_size}) or --precision fp32")


class AmpStepper:
    """``autocast()`` for the forward; ``step(loss)`` = scale, backward, unscale + clip (if on), optimiser
    step, scaler update, zero_grad. No host sync: the gradient norm stays a device tensor."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], device: torch.device,
                 precision: str, clip_grad: float = 0.0):
        self.optimizer, self.params, self.device = optimizer, list(params), device
        self.dtype = DTYPES[precision]
        self.clip_grad = clip_grad
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def step(self, loss: Tensor) -> Tensor | None:
        self.scaler.scale(loss).backward()
        norm = None
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.params, self.clip_grad, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, lrs):  # the schedule sets lr before every step; keep
            group["lr"] = lr                                       # the object a captured step reads
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
