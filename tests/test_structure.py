"""The package's import contract and house rules, checked on the source (no imports needed):

- no import cycle between csearch modules, counting imports inside functions too (a lazy import
  hides a cycle from Python, not from a reader);
- no library module imports a front end (the CLI, `python -m csearch.evaluate`, the trainer's CLI);
- the query path imports neither Keras nor TensorFlow;
- no module grows past the size where it starts doing several jobs;
- ruff passes with the project's settings (ruff.toml).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "csearch"
FRONT_ENDS = {
    "csearch.cli",
    "csearch.commands",
    "csearch.__main__",
    "csearch.evaluate",
    "csearch.train.__main__",
    "csearch.train.cli",
}
MAX_LINES = 500  # about 450 is the aim; a module past 500 is doing more than one job


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The csearch modules that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_cycle_finder_finds_a_cycle():
    # the check itself must be able to fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_are_resolved(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from ..store import durable\nfrom . import errors\n\ndef f():\n    from .cli import main\n")
    known = {
        "csearch.store",
        "csearch.store.durable",
        "csearch.x.errors",
        "csearch.x.cli",
        "csearch.x.mod",
        "csearch.x",
    }
    assert imported("csearch.x.mod", source, known) == {
        "csearch.store",
        "csearch.store.durable",
        "csearch.x",
        "csearch.x.errors",
        "csearch.x.cli",
    }


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (lazy imports included): " + "; ".join(" <-> ".join(c) for c in found)


def test_library_modules_do_not_import_front_ends():
    graph = import_graph()
    offenders = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items()
        if name not in FRONT_ENDS
        for target in targets & FRONT_ENDS
    )
    assert not offenders, offenders


def test_modules_stay_small():
    large = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    large = {name: lines for name, lines in large.items() if lines > MAX_LINES}
    assert not large, f"modules over {MAX_LINES} lines (split them by job): {large}"


def test_query_path_imports_neither_keras_nor_tensorflow():
    code = (
        "import sys\n"
        "import csearch, csearch.pipeline, csearch.search, csearch.store, csearch.models, csearch.localize, "
        "csearch.classify, csearch.embed, csearch.masks, csearch.knn, csearch.config, csearch.console, "
        "csearch.embedder.run, csearch.embedder.trunk, csearch.resolve, csearch.engine\n"
        "heavy = sorted(m for m in ('keras', 'tensorflow') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]


def test_ruff_passes():
    # ruff is a dev dependency, so a missing ruff fails here rather than skipping the check
    repo = PACKAGE.parent
    check = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--quiet", "."], cwd=repo, capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-1000:]
    fmt = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--quiet", "."],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fmt.returncode == 0, "not formatted (run `ruff format .`): " + fmt.stdout[-2000:]
