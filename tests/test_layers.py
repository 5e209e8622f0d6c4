"""The import graph of `dit_accel`, read from the source: no circle, no arrow running back up a layer,
and no module importing a private name from another top-level module (docs/DESIGN.md has the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dit_accel"

#: top-level modules and folders of dit_accel, top layer first: a module imports only from its own
#: layer's modules (without a circle) or from layers below it
LAYERS = [
    ("__main__", "__init__"),  # entry points; the package's __init__ re-exports the public names
    ("pipelines",),
    ("cli",),
    ("ui", "bench", "gpu_check"),
    ("tuning", "finetune"),
    ("outputs", "cli_options"),
    ("comparison",),
    ("calibration",),
    ("api", "plan_spec", "loading"),
    ("plan_files",),
    ("techniques",),
    ("runtime", "testing"),
    ("attention", "metrics"),
    ("models",),
    ("tokens", "config", "machine"),
]
RANK = {area: rank for rank, areas in enumerate(LAYERS) for area in areas}


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in PACKAGE.rglob("*.py")}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> list[tuple[str, str]]:
    """(module imported, name imported or "") for every import of dit_accel in `module`, wherever it is
    (functions and TYPE_CHECKING blocks too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("dit_accel")]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            target = (".".join(base[:len(base) - node.level + 1] + [node.module] if node.module else
                               base[:len(base) - node.level + 1]) if node.level else node.module or "")
            if target.startswith("dit_accel"):
                for alias in node.names:
                    child = f"{target}.{alias.name}"
                    found.append((child, "") if child in MODULES else (target, alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        for target, _ in _imports(module, path):
            while target not in MODULES:
                target = target.rsplit(".", 1)[0]
            if target != module:
                graph.setdefault(module, set()).add(target)
    return graph


def test_every_top_level_module_has_a_layer():
    assert {_area(module) for module in MODULES} == set(RANK)


def test_no_arrow_runs_back_up():
    upward = sorted(f"{source} -> {target}" for source, targets in _graph().items() for target in targets
                    if RANK[_area(target)] < RANK[_area(source)])
    assert not upward


def test_no_import_circle():
    graph, order, low, stack, on_stack, circles = _graph(), {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for module in MODULES:
        if module not in order:
            visit(module)
    assert not circles


def test_no_private_name_crosses_top_level_modules():
    crossing = sorted(f"{module} imports {name} from {target}" for module, path in MODULES.items()
                      for target, name in _imports(module, path)
                      if name.startswith("_") and _area(target) != _area(module))
    assert not crossing
