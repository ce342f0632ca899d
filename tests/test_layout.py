"""The package layout keeps the stages apart: imports only go down the stage order, never in a circle;
one ``ray.init``; no module grows into a room that hides its stages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hbt_ray"
#: Import order of the stages: a module may import its own stage and those before it. evaluate sits
#: below train because the trainer's intermediate evaluations use it; the data flows
#: pairs → sampler → train → evaluate → tune.
LAYERS = {"config": 0, "cluster": 0, "provenance": 0, "storage": 0, "data": 1, "sampler": 2, "model": 3, "loss": 4, "evaluate": 5,
          "train": 6, "tune": 7, "reproduce": 8}  # fmt: skip
MAX_LINES = 450
LONG_ALLOWED: set[str] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """hbt_ray modules ``name`` imports, at the top or lazily inside functions."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hbt_ray")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if not base.startswith("hbt_ray"):
                continue
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_imports_only_go_down_the_stage_order():
    modules = _modules()
    assert set(LAYERS) <= {m.split(".")[1] for m in modules if "." in m}, "a stage of LAYERS is missing"
    upward = []
    for name, path in modules.items():
        mine = _layer(name)
        for dep in _imports(path, name, modules):
            theirs = _layer(dep)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{name} imports {dep}")
    assert not upward, upward


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_only_ray_init_is_in_cluster_py():
    calls = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for folder in ("hbt_ray", "scripts")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "init"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "ray"
    ]
    assert len(calls) == 1 and calls[0].startswith("hbt_ray/cluster.py:"), calls


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_a_room_that_hides_its_stages(path):
    if path.name in LONG_ALLOWED and path.parent == PACKAGE:
        return
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by concern"
