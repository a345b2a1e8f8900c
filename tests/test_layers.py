"""Lower layers (attention, losses, metrics, transforms, networks, data) never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import medgain

ROOT = Path(medgain.__file__).parent
LOWER = ["attention.py", "attention_fov.py", "saliency.py", "losses", "metrics", "transforms", "networks", "data"]
HIGHER = ("medgain.handlers", "medgain.cli", "medgain.registry", "medgain.pipeline", "medgain.study",
          "medgain.tracking", "medgain.partner", "medgain.demo")


def _modules(name: str) -> list[Path]:
    path = ROOT / name
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("name", LOWER)
def test_lower_layers_import_no_higher_one(name: str) -> None:
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in _modules(name) for m in _imports(p) if m.startswith(HIGHER)}
    assert not bad, sorted(bad)
