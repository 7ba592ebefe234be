"""docs/architecture.md stays true: the files it names exist, the names it puts in parentheses are defined in
the file before them, every module of ahbf/ has a row, and ahbf/ has no import circle (issue 25)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
KNOWN_CIRCLES: list[set[str]] = []  # none left


def repo_path(token: str) -> Path | None:
    """A file or folder the doc names (``engine/x.py`` and ``kernels/x.py`` are under ahbf/), else None."""
    if "/" not in token or " " in token or token.startswith(("runs/", "ahbf::")):
        return None
    return ROOT / ("ahbf/" + token if token.startswith(("engine/", "kernels/")) else token)


def table_rows() -> list[list[str]]:
    """The backticked tokens of each row's file column, in order."""
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and line.count("|") == 3]
    return [re.findall(r"`([^`]+)`", row.split("|")[2]) for row in rows if row != "| concept | file |"]


def test_named_files_exist_and_named_symbols_are_defined_there():
    rows = table_rows()
    assert len(rows) >= 30
    for tokens in rows:
        current = None
        for token in tokens:
            path = repo_path(token)
            if path is not None:
                matches = list(ROOT.glob(str(path.relative_to(ROOT)))) if "*" in token else [path]
                assert matches and all(p.exists() for p in matches), f"docs/architecture.md names {token}"
                current = path if path.suffix == ".py" and "*" not in token else None
            elif IDENTIFIER.fullmatch(token) and current is not None:
                defined = rf"^(\s*(class|def)\s+{token}\b|{token}\s*(:[^=\n]*)?=)"
                assert re.search(defined, current.read_text(), re.M), f"{token} is not defined in {current}"
    for token in re.findall(r"`([^`]+)`", DOC.read_text()):  # the rest of the page (walk-through, lists)
        path = repo_path(token)
        assert path is None or "*" in token or path.exists(), f"docs/architecture.md names {token}"


def test_every_module_has_a_row():
    named = [repo_path(t) for row in table_rows() for t in row]
    patterns = [str(p.relative_to(ROOT)) for p in named if p is not None]
    for module in sorted((ROOT / "ahbf").rglob("*.py")):
        rel = module.relative_to(ROOT)
        if module.name == "__init__.py" and rel.parent != Path("ahbf/methods"):
            continue
        covered = any(rel.match(p) if "*" in p else str(rel) == p or str(rel).startswith(p.rstrip("/") + "/")
                      for p in patterns)
        assert covered, f"{rel} has no row in docs/architecture.md"


def imports(path: Path) -> set[str]:
    """The ahbf/ files that ``path`` imports, wherever the import statement is (functions, TYPE_CHECKING)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            base += node.module.split(".") if node.module else []
            candidates = [(base + [alias.name], base) for alias in node.names]  # y itself if a module, else x
        elif isinstance(node, ast.Import):
            candidates = [(alias.name.split("."),) for alias in node.names]
        else:
            continue
        for options in candidates:
            for parts in options:
                files = (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py"))
                target = next((f for f in files if parts[:1] == ["ahbf"] and f.exists()), None)
                if target is not None:
                    found.add(str(target.relative_to(ROOT)))
                    break
    return found - {str(path.relative_to(ROOT))}


def test_ahbf_has_no_import_circle():
    graph = {str(p.relative_to(ROOT)): imports(p) for p in (ROOT / "ahbf").rglob("*.py")}
    index, low, stack, circles = {}, {}, [], []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                circles.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert sorted(map(sorted, circles)) == sorted(map(sorted, KNOWN_CIRCLES)), circles
