"""The layout holds: layers import downwards only, no import cycle, no hidden imports.

Read from the source (``ast``), not by importing it, so a cycle that Python would
happen to resolve still fails here:

* ``replyx`` (the shared library) is a leaf: it imports none of the project's
  other packages; ``replyx_client`` imports only ``replyx``; the two servers
  (``backend``, ``ws_gateway``) import the library and never each other; only
  ``replyx_ops`` (the operator tools) sits on top of them all;
* no cycle between modules, ``TYPE_CHECKING`` imports included;
* imports sit at the top of a module; the few inside a function are listed
  below with the reason (an optional dependency, a slow or noisy import);
* no module is longer than ~400 lines unless it is listed with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("replyx", "replyx_client", "replyx_ops", "backend", "ws_gateway", "migrations")

#: What each package may import from the project, besides itself.
ALLOWED = {
    "replyx": set(),
    "replyx_client": {"replyx"},
    "backend": {"replyx"},
    "ws_gateway": {"replyx"},
    "migrations": set(),
    "replyx_ops": {"replyx", "replyx_client", "backend", "ws_gateway"},
}

#: Imports inside a function, and why each one is there.
LOCAL_IMPORTS = {
    # pgserver warns about XDG_RUNTIME_DIR when imported; only the embedded server needs it.
    ("replyx/pg.py", "pgserver._commands"),
    ("replyx/pg.py", "pgserver.utils"),
    # matplotlib is optional (the bench extra) and slow to import: only for the plot.
    ("replyx_ops/bench/report.py", "matplotlib"),
    ("replyx_ops/bench/report.py", "matplotlib.pyplot"),
    # gunicorn's config file is executed by gunicorn; the hook runs in the master.
    ("conf/gunicorn.conf.py", "prometheus_client"),
}

#: Modules allowed past MAX_LINES: one algorithm or one table that reads best whole.
LONG_MODULES: dict[str, str] = {
    "replyx/settings.py": "the one table of every setting (conf/replyx.env.example is generated"
                          " from it); each setting adds its two to five lines here",
}
MAX_LINES = 420


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """``(module, at top level)`` for every project module ``path`` imports."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []
    top_level = {id(node) for node in tree.body}
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks count as top level
            top_level.update(id(child) for child in node.body)
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, id(node) in top_level))
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {t for t, _ in imports_of(name, path, known)} for name, path in mods.items()}


def test_layers_import_downwards_only() -> None:
    wrong = []
    for name, targets in graph().items():
        package = name.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" → ".join(c) for c in cycles)


def test_imports_are_at_the_top_of_each_module() -> None:
    local = []
    for path in [*modules().values(), ROOT / "conf" / "gunicorn.conf.py"]:
        tree = ast.parse(path.read_text(), str(path))
        rel = str(path.relative_to(ROOT))
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                local += [f"{rel}: {n}" for n in names if (rel, n) not in LOCAL_IMPORTS]
    assert not local, "imports inside functions:\n" + "\n".join(sorted(set(local)))


def test_modules_stay_readable_in_length() -> None:
    long = []
    for path in modules().values():
        rel = str(path.relative_to(ROOT))
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and rel not in LONG_MODULES:
            long.append(f"{rel}: {lines} lines")
    assert not long, "\n".join(long)
