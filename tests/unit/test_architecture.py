"""The package is a layering: every import of one of the package's modules points down (or within a package),
never up, and no modules import each other in a circle. docs/architecture.md explains the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "normsoftmax"

# Bottom first. A module may import from its own layer's other packages only where the table says so below.
LAYERS = [
    ["files", "runtime", "faults", "version"],
    ["data", "loss", "weights"],
    ["config"],
    ["model", "prepare"],
    ["checkpoint"],
    ["embedding"],
    ["evaluation"],
    ["calibration", "training"],
    ["search", "report", "export"],
    ["demo"],
    ["cli", "__init__"],
    ["__main__"],
]
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def unit_of(module: str) -> str:
    """``normsoftmax.data.images`` -> ``data``; the package's own ``__init__`` is its public API."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    relative = path.relative_to(package.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def internal_imports(path: Path, package_root: Path = PACKAGE) -> set[str]:
    """Every ``normsoftmax...`` module ``path`` imports, at any depth of the file (lazy imports count too)."""
    name = module_name(path, package_root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "normsoftmax":
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "normsoftmax")
    modules = {module_name(p, package_root) for p in package_root.rglob("*.py")}
    return {target for target in found if target in modules}


def all_modules(package_root: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(path, package_root): internal_imports(path, package_root)
            for path in sorted(package_root.rglob("*.py"))}


def upward_imports(module: str, targets: set[str]) -> list[str]:
    """The imports of ``module`` that point to its own layer or above (within one package is fine)."""
    upward = []
    for target in sorted(targets):
        if unit_of(target) == unit_of(module) or unit_of(module) == "__init__":
            continue  # inside one package; the public API's lazy table may name anything
        if LAYER_OF[unit_of(target)] >= LAYER_OF[unit_of(module)]:
            upward.append(f"{target} (layer {LAYER_OF[unit_of(target)]})")
    return upward


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (a module and its own package's __init__ excepted), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def linked(node: str, target: str) -> bool:
        # importing a submodule runs its package's __init__, and a package re-exports its submodules: by design
        return target != node and not target.startswith(node + ".") and not node.startswith(target + ".")

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if not linked(node, target):
                continue
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if state.get(target) is None and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node, [node])):
            return cycle
    return None


def test_every_package_of_the_source_has_a_layer():
    units = {unit_of(name) for name in all_modules()}
    assert units <= set(LAYER_OF), f"add {sorted(units - set(LAYER_OF))} to LAYERS (and docs/architecture.md)"


@pytest.mark.parametrize("module", sorted(all_modules()))
def test_imports_point_down(module):
    upward = upward_imports(module, all_modules()[module])
    assert not upward, f"{module} (layer {LAYER_OF[unit_of(module)]}) imports up or sideways: {', '.join(upward)}"


def test_no_import_circles():
    cycle = find_circle(all_modules())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    """On a made-up package: data importing training (lazily, inside a function), and two demo modules that
    import each other, are both found."""
    root = tmp_path / "normsoftmax"
    for folder in ("data", "training", "demo"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "data" / "images.py").write_text("def f():\n    from ..training.recipe import train\n")
    (root / "training" / "recipe.py").write_text("from ..data import images\n")
    (root / "demo" / "command.py").write_text("from .transfer import run\n")
    (root / "demo" / "transfer.py").write_text("from normsoftmax.demo.command import table\n")
    graph = all_modules(root)
    assert graph["normsoftmax.data.images"] == {"normsoftmax.training.recipe"}
    assert upward_imports("normsoftmax.data.images", graph["normsoftmax.data.images"])
    assert not upward_imports("normsoftmax.training.recipe", graph["normsoftmax.training.recipe"])
    cycle = find_circle(graph)
    assert cycle is not None and set(cycle) == {"normsoftmax.data.images", "normsoftmax.training.recipe"}
    (root / "data" / "images.py").write_text("import torch\n")
    cycle = find_circle(all_modules(root))
    assert cycle is not None and set(cycle) == {"normsoftmax.demo.command", "normsoftmax.demo.transfer"}
