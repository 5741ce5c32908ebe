"""The package's layers, read from the source: lower layers never import higher ones, and no import circle exists.

Every import counts: at module level, inside functions and under `if TYPE_CHECKING:` (a type-only import still ties
two modules together for a reader). The layers, lowest first, are those of DESIGN.md section 4.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "slowfast_adapter"
ROOT = Path(__file__).parents[1] / PACKAGE

# Lowest first. A module belongs to the layer of the longest prefix that names it (a folder or a module).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("shared types and fences", ("version", "config", "configs", "core.types", "core.surface")),
    ("core", ("core",)),
    ("families", ("families",)),
    ("adapter files and the Hub", ("io",)),
    ("wrapper", ("model", "adapters")),
    ("inference", ("inference",)),
    ("training", ("training",)),
    ("tools", ("tools",)),
    ("demo", ("demo",)),
    ("serving", ("serve",)),
    ("entry points", ("cli", "")),  # "": the package's own __init__ (lazy exports of the public names)
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its source (relative to the package, "" for its __init__)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                target = node.module[len(PACKAGE) + 1 :]
            else:
                continue
            for alias in node.names:  # `from . import x` / `from .pkg import module` import a module
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name[len(PACKAGE) + 1 :])
    return {m for m in found if m != name}


def layer_of(name: str) -> int:
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (prefix == name or name.startswith(prefix + ".") or prefix == "") and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{name} is in no layer"
    return best


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer_and_imports_resolve():
    edges = graph()
    assert "model" in edges and "core.types" in edges  # the walk really found the package
    for name, targets in edges.items():
        layer_of(name)
        unknown = targets - set(edges)
        assert not unknown, f"{name} imports {unknown}, which the walk did not find"


def test_lower_layers_never_import_higher_ones():
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for name, targets in graph().items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(name) and not (name == "" or target == "")
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    edges = {name: targets - {""} for name, targets in graph().items() if name != ""}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(edges.get(name, ())):
            if state.get(target) == 1:
                circles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_walk_sees_type_only_and_function_level_imports(tmp_path):
    """The checks above would be blind if `imports` skipped `if TYPE_CHECKING:` blocks or imports in functions."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .model import SlowFastModel\n"
        "def f():\n    from .io import hub\n    import slowfast_adapter.tools.flops\n"
    )
    found = imports("probe", source, {"model", "io.hub", "tools.flops"})
    assert found == {"model", "io.hub", "tools.flops"}
