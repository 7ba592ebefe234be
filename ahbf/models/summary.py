"""Parameter counts of the registered models (``python -m ahbf.models.summary`` prints the docs table)."""
from __future__ import annotations

import torch

from .registry import create_model, default_aux

# (arch, classes, method): the configurations the paper's tables use; M = 4 branches
TABLE_ROWS = [(a, 100, m) for a in ("resnet32", "resnet56", "resnet110") for m in ("baseline", "dml", "one", "ahbf")]
TABLE_ROWS += [(a, 1000, m) for a in ("resnet18", "resnet34", "resnet50") for m in ("baseline", "ahbf")]
ZOO_ROWS = [(a, 100, m) for a in ("vgg16", "vgg19", "densenet40_k12", "densenet100_k12", "densenet100_k40",
                                  "mobilenetv2_x0_5") for m in ("baseline", "dml", "one", "ahbf")]


def count_parameters(arch: str, method: str, num_classes: int, num_branches: int = 4) -> tuple[int, int]:
    """(parameters trained, parameters of the exported target network); built on the meta device."""
    with torch.device("meta"):
        model = create_model(arch, method, num_classes=num_classes, num_branches=num_branches)
        target = create_model(arch, "baseline", num_classes=num_classes)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in target.parameters())


def parameter_table(rows=TABLE_ROWS) -> str:
    lines = ["| arch | classes | method | aux | trained params | target params |", "|---|---|---|---|---|---|"]
    for arch, k, method in rows:
        total, target = count_parameters(arch, method, k)
        aux = default_aux(arch, method)
        lines.append(f"| {arch} | {k} | {method} | {aux} | {total:,} | {target:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(parameter_table())
    print()
    print(parameter_table(ZOO_ROWS))
