"""The two model families never import each other (AST scan of every import, both ways)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[3] / "sautomed"


def _imports(folder: Path) -> list[tuple[str, str]]:
    found = []
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                found += [(path.name, node.module)] + [
                    (path.name, f"{node.module}.{a.name}") for a in node.names
                ]
    return found


def _offending(folder: Path, other: str) -> list[tuple[str, str]]:
    return [(f, m) for f, m in _imports(folder) if m == other or m.startswith(other + ".")]


def test_msam_does_not_import_sautomed_family():
    assert (PKG / "models" / "msam" / "network.py").is_file()
    assert _offending(PKG / "models" / "msam", "sautomed.models.sautomed") == []


def test_sautomed_family_does_not_import_msam():
    assert _offending(PKG / "models" / "sautomed", "sautomed.models.msam") == []


def test_the_scan_sees_imports():
    names = {m for _, m in _imports(PKG / "models" / "msam")}
    assert "sautomed.models.sam.upstream" in names
