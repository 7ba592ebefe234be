"""``ahbf-eval`` and ``ahbf-export``: a checkpoint -> a test-set table, or a plain target state dict."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

from ..evaluation import evaluate, format_table
from ..methods import build_graph, get_method
from ..models import backbones, create_model, get_arch, target_state_dict
from ..pipelines import build_data, no_test_set_note
from .checkpoint import check_spec, describe, load_checkpoint, load_weights
from .durable import atomic_save, write_text
from .checks import validate
from .config import config_from_dict, set_value
from .distributed import resolve_device
from .precision import AmpStepper, param_dtype, resolve_precision
from .resolve import image_dtype, rechoose_machine, resolve_objective
from .task import OKDTask


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device | str = "cpu",
                          path: str = "checkpoint") -> torch.nn.Module:
    """The model of ``ckpt``; missing or reshaped weights are one ``CheckpointError`` line naming them."""
    spec = ckpt["spec"]
    model = create_model(spec["arch"], spec["method"], spec["num_classes"], spec["num_branches"], spec["aux"],
                         split=spec.get("split"))
    load_weights(model, ckpt["model"], path)
    return model.to(device).eval()


def run_eval(path: str, split: str = "test", overrides: list[tuple[str, Any]] = (),
             json_path: str = "") -> dict[str, dict[str, float]]:
    """Top-1 / top-5 of every branch and TA of a checkpoint on its data set's test (or val) split; with
    ``json_path``, also written there as JSON (``as_json``)."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be test or val, got {split!r}")
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    # the training machine's choices (config.yaml records them resolved) need not exist here: choose again
    # no up-front scan of every image (for ImageNet: 1.28M training files to evaluate 50k); a bad image is
    # still a one-line error naming it when it is decoded. `data.check_images=...` overrides this.
    cfg = rechoose_machine(cfg).replace(data={"check_images": "none"})
    for key, value in overrides:
        cfg = set_value(cfg, key, value)
    cfg = validate(cfg)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    data = build_data(dataclasses.replace(cfg.data, dtype=image_dtype(precision, cfg.data.dtype)), device=device)
    loader = data.test if split == "test" else data.val
    if loader is None:
        raise ValueError(f"the checkpoint's data config has no {split} split (data.val_fraction = 0)")
    spec = ckpt["spec"]
    if data.num_classes != spec["num_classes"]:
        check_spec(spec, {**spec, "num_classes": data.num_classes}, path)
    model = model_from_checkpoint(ckpt, device, path).to(param_dtype(precision))
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    amp = AmpStepper(torch.optim.SGD(model.parameters(), lr=0.0), model.parameters(), device, precision)
    objective = resolve_objective(cfg.objective, spec["method"], cfg.train.epochs)
    method = get_method(spec["method"])
    task = OKDTask(model, build_graph(method, spec["num_branches"], objective), objective, amp.autocast, method=method)
    metrics = evaluate(task.predict, loader, task.node_names, device=device)
    stand_in = no_test_set_note(cfg.data) if split == "test" else ""  # a folder without test/: the val split
    print(format_table(metrics, f"{path}: {describe(spec)}, epoch {ckpt.get('epoch')}, {cfg.data.dataset} {split} "
                                f"split{f' = {stand_in}' if stand_in else ''}, {precision}"))
    if json_path:
        info = {"checkpoint": path, "epoch": ckpt.get("epoch"), "spec": dict(spec), "dataset": cfg.data.dataset,
                "split": split, "precision": precision}
        write_text(json_path, json.dumps(as_json(metrics, info), indent=1) + "\n")
        other = "val" if split == "test" else "test"
        print(f"wrote {json_path}: the {split} split ('split' in the file; --split {other} for the {other} split)")
    return metrics


def as_json(metrics: dict[str, dict[str, float]], info: dict[str, Any]) -> dict[str, Any]:
    """``info`` plus ``samples`` and ``nodes``: ``{name: {top1, top5, loss, samples}}`` in table order
    (accuracies in %, loss = mean cross-entropy)."""
    n = metrics["_samples"]["n"]
    nodes = {name: {**m, "samples": n} for name, m in metrics.items() if not name.startswith("_")}
    return {**info, "target": "branch0", "samples": n, "nodes": nodes}


def run_export(path: str, output: str = "") -> str:
    """Write trunk + target branch as the plain network's state dict (strict-loadable into
    ``ahbf.models.create_plain(arch, K)``; for resnet18/34/50 into torchvision's model)."""
    ckpt = load_checkpoint(path)
    spec = ckpt["spec"]
    model = model_from_checkpoint(ckpt, path=path)  # weights that do not fit their own spec: one line
    arch, k = spec["arch"], spec["num_classes"]
    output = output or os.path.join(os.path.dirname(path) or ".", f"{arch.replace(':', '-')}_target.pt")
    atomic_save(target_state_dict(model), output)
    if backbones.is_library(arch):
        build = backbones.constructor_text(arch, k)
    else:
        build = (f"torchvision.models.{arch}(num_classes={k})" if get_arch(arch).imagenet
                 else f"ahbf.models.create_plain({arch!r}, {k})")
    print(f"wrote {output}: the target branch of {describe(spec)} as a plain {arch} state dict\n"
          f"load it with: model = {build}; model.load_state_dict(torch.load({output!r}, weights_only=True))")
    return output
