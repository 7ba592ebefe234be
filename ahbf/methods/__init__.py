"""The online-KD methods: one module per method, each holding one ``Method`` record (``base.py``).

The built-in methods are ``METHODS`` (the order of the comparison tables: the baseline first, AHBF last). A
method of one's own is a module holding a ``Method`` too, named on the command line by its import path
(``--method mypkg.mymodule:MyMethod``) or by the name of an ``ahbf.methods`` entry point of an installed
package (docs/methods.md, "Write your own method"). Everything else asks ``get_method``: ``create_model``
(model kind, families, branch count, parts), ``build_graph`` (the one graph factory), ``engine/resolve.py``
(the ``auto`` defaults), the task (hooks), the config's checks and the benchmarks.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ..kernels.graph import DistillGraph
from .ahbf import AHBF
from .base import ALL_FAMILIES, MULTI_BRANCH, PEERS, PLAIN, Body, Method, Part
from .baseline import BASELINE
from .cl_ilr import CL_ILR
from .dml import DML
from .kdcl import KDCL
from .okddip import OKDDIP
from .one import ONE
from .pcl import PCL

METHODS: dict[str, Method] = {m.name: m for m in (BASELINE, DML, ONE, CL_ILR, OKDDIP, KDCL, PCL, AHBF)}
ENTRY_POINTS = "ahbf.methods"  # the entry-point group of methods in installed packages
_LOADED: dict[str, Method] = {}  # a user's methods, by import path / entry-point name and by record name

__all__ = ["ALL_FAMILIES", "MULTI_BRANCH", "PEERS", "PLAIN", "Body", "Method", "Part", "METHODS", "ENTRY_POINTS",
           "get_method", "is_plugin", "build_graph", "methods_for", "methods_markdown"]


def is_plugin(name: str) -> bool:
    """``name`` names a user's method: an import path ``module:attribute`` or an entry point's name."""
    return name not in METHODS and (":" in name or bool(entry_points(group=ENTRY_POINTS, name=name)))


def get_method(name: str) -> Method:
    """The record of ``name``: a built-in's name, a user's method's import path (``module:attribute``, imported
    once), the name of an ``ahbf.methods`` entry point, or the record name of a method loaded so far. An unknown
    name raises a one-line ValueError listing the built-in ones."""
    method = METHODS.get(name) or _LOADED.get(name)
    if method is not None:
        return method
    if ":" in name:
        return _remember(name, _import(name))
    found = entry_points(group=ENTRY_POINTS, name=name)
    if found:
        return _remember(name, _import(next(iter(found)).value))
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}, or give the import path of "
                     f"your own (module:attribute)")


def _import(path: str) -> Method:
    module, _, attribute = path.partition(":")
    try:
        method = getattr(importlib.import_module(module), attribute)
    except (ImportError, SyntaxError) as err:
        raise ValueError(f"method {path!r}: cannot import {module!r} ({type(err).__name__}: {err}); is its folder "
                         "on PYTHONPATH?") from None
    except AttributeError:
        raise ValueError(f"method {path!r}: module {module!r} has no attribute {attribute!r}") from None
    if not isinstance(method, Method):
        raise ValueError(f"method {path!r}: expected an ahbf.methods.Method, got {type(method).__name__}")
    return method


def _remember(key: str, method: Method) -> Method:
    known = METHODS.get(method.name) or _LOADED.get(method.name)
    if known is not None and known is not method:
        raise ValueError(f"method {key!r}: its name {method.name!r} is taken by another method; rename it")
    _LOADED[key] = _LOADED[method.name] = method  # by name too: the task finds it from its graph's name
    return method


def build_graph(method: str | Method, num_branches: int, objective=None, **options) -> DistillGraph:
    """The distillation graph of ``method`` with ``num_branches`` branches: the one graph factory.

    ``objective``: a resolved ``ObjectiveConfig`` (no ``auto`` left): its ``detach_teacher`` and the fields the
    record's ``options`` name go to the constructor. None: the record's teacher side and the constructor's
    defaults. ``options``: constructor keywords that override both."""
    m = get_method(method) if isinstance(method, str) else method
    if objective is None:
        return m.graph(num_branches, detach_teacher=m.detach, **options)
    if not isinstance(objective.detach_teacher, bool):
        raise ValueError(f"objective.detach_teacher is {objective.detach_teacher!r}: resolve the config first "
                         "(ahbf.engine.resolve.resolve_objective)")
    kw = {arg: getattr(objective, key) for arg, key in m.options}
    return m.graph(num_branches, detach_teacher=objective.detach_teacher, **{**kw, **options})


def methods_for(family: str) -> list[str]:
    """The built-in methods an architecture family builds."""
    return [m.name for m in METHODS.values() if family in m.families]


def methods_markdown() -> str:
    """The method table as Markdown (docs/methods.md embeds it; a test keeps it current)."""
    lines = ["| `--method` | name | model | families | branches | ramp (auto) | rampup (auto) | teacher (auto) "
             "| kd_weight (auto) | what |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS.values():
        teacher = "(no KL)" if m.model == PLAIN else "detached" if m.detach else "not detached"
        branches = "1" if m.model == PLAIN else f">= {m.min_branches}"
        model = m.model + (f" + {m.wrap.__name__}" if m.wrap else "")
        lines.append(f"| `{m.name}` | {m.label} | {model} | {', '.join(m.families)} | {branches} | "
                     f"{m.ramp} | {m.rampup * 300:g} of 300 epochs | {teacher} | {m.kd_weight:g} | {m.description} |")
    return "\n".join(lines)
