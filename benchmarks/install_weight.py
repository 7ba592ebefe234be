"""What ``pip install -e .`` and each extra put on disk: installed size per distribution (its RECORD's files),
grouped by what pulls it in, read from an existing environment (installs nothing).

The groups follow ahbf's own metadata (setup.py's install_requires and extras, as installed): the base is
the dependency closure of install_requires; an extra adds the closure of its requirements minus the base.
Torch's CUDA libraries and Triton are shown apart (PyPI's Linux torch wheel pulls them even on a CPU box).

    python benchmarks/install_weight.py                 # this interpreter's environment
    python benchmarks/install_weight.py --out benchmarks/results/install_weight.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

MB = 1e6


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, metadata.Distribution]:
    return {norm(d.metadata["Name"]): d for d in metadata.distributions()}


def size(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        try:
            total += os.path.getsize(f.locate())
        except OSError:
            pass
    return total


def closure(requirements: list[Requirement], dists: dict[str, metadata.Distribution]) -> set[str]:
    """The installed distributions that ``requirements`` need, transitively (markers and extras honoured)."""
    seen: set[tuple[str, frozenset]] = set()
    stack = list(requirements)
    while stack:
        req = stack.pop()
        name, extras = norm(req.name), frozenset(req.extras)
        if (name, extras) in seen or name not in dists:
            continue
        seen.add((name, extras))
        for text in dists[name].requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""})):
                stack.append(sub)
    return {name for name, _ in seen}


def groups(dists) -> dict[str, set[str]]:
    reqs = [Requirement(r) for r in dists["ahbf"].requires or []]
    base_reqs = [r for r in reqs if r.marker is None]
    extras = sorted({m for r in reqs if r.marker is not None for m in re.findall(r'extra == "([^"]+)"', str(r.marker))})
    base = closure(base_reqs, dists)
    torch_only = closure([Requirement("torch")], dists) - closure(
        [Requirement(r) for r in dists["torch"].requires or [] if not re.search(r"nvidia|cuda|triton", r)], dists)
    out = {"base: torch": {"torch"}, "base: torch's CUDA libraries and Triton": torch_only - {"torch"},
           "base: the rest": base - torch_only}
    for extra in extras:
        mine = [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": extra})]
        absent = [r.name for r in mine if norm(r.name) not in dists]
        label = f".[{extra}]" + (f" ({', '.join(absent)} not installed here)" if absent else "")
        out[label] = closure([Requirement(f"{r.name}{r.specifier}") for r in mine], dists) - base
    return out


def report(dists) -> str:
    sizes = {n: size(d) for n, d in dists.items()}
    lines = [f"Installed size per group ({sys.prefix}, python {sys.version.split()[0]}, "
             f"{datetime.date.today().isoformat()}); MB = 10^6 bytes, files listed in each distribution's RECORD.", "",
             "| group | distributions | MB | largest |", "|---|---:|---:|---|"]
    for name, members in groups(dists).items():
        top = sorted(members, key=lambda n: -sizes[n])[:6]
        lines.append(f"| {name} | {len(members)} | {sum(sizes[n] for n in members) / MB:,.0f} | "
                     + ", ".join(f"{n} {sizes[n] / MB:,.0f}" for n in top) + " |")
    lines.append(f"| everything installed | {len(sizes)} | {sum(sizes.values()) / MB:,.0f} | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    args = p.parse_args()
    dists = installed()
    if "ahbf" not in dists:
        sys.exit("install_weight: ahbf is not installed in this environment (pip install -e .)")
    text = report(dists)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
