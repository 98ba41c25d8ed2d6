"""Layers only import downward (docs/architecture.md): every import in the package, lazy ones
inside functions included, goes to a module of the same layer or a lower one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_real"

LAYERS: dict[str, int] = {
    # 1: the vocabulary everything else uses
    "dataflow": 1,
    "distributed": 1,
    "features": 1,
    "layout": 1,
    "registry": 1,
    "compat": 1,
    "quiet": 1,
    "loggers": 1,
    "checkpoint": 1,
    # 2: models and their moves
    "models": 2,
    "realloc": 2,
    "resume": 2,
    # 3: plans, graphs, losses, data
    "plans": 3,
    "graphs": 3,
    "algorithms": 3,
    "data": 3,
    # 4: the runtime and the planner
    "runtime": 4,
    "planner": 4,
    # 5: Lightning
    "module": 5,
    "modules": 5,
    "strategy": 5,
    "launcher": 5,
    "summary": 5,
    "progress": 5,
    "display": 5,
    # 6: user-facing
    "recipes": 6,
    "cli": 6,
}


def _part(module: str) -> str:
    """The top-level part of ``lightning_real.x.y`` ('x')."""
    return module.split(".")[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported lightning_real module) of every import in the file, TYPE_CHECKING ones aside."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for b in node.body for n in ast.walk(b))
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_real."):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("lightning_real.")]
    return out


def test_every_part_has_a_layer() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("_")}
    parts = {p for p in parts if (PACKAGE / p).is_dir() or (PACKAGE / f"{p}.py").is_file()}
    assert parts - {"py"} <= set(LAYERS), sorted(parts - set(LAYERS))


def test_imports_point_down() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        if module in ("lightning_real.__init__", "lightning_real.__main__"):
            continue
        here = LAYERS[_part(module)]
        for line, target in _imports(path):
            there = LAYERS[_part(target)]
            if there > here:
                upward.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {target} ({there})"
                )
    assert not upward, "\n".join(upward)
