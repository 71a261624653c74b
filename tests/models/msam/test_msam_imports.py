"""M-SAM and the other model families never import each other: an AST scan of every import (relative ones
resolved), both ways, and what importing each family actually loads (transitive imports through shared code).

3D-SAutoMed's family code is ``sautomed.models.sautomed`` and its LightningModule ``sautomed.module``; the
baselines' is ``sautomed.models.baselines``. Only ``sautomed.families`` (the CLI's table) knows them all.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[3] / "sautomed"
MSAM = "sautomed.models.msam"
SAUTOMED_FAMILY = ("sautomed.models.sautomed", "sautomed.module")
BASELINES = ("sautomed.models.baselines",)


def _module_name(path: Path, root: Path = PKG.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(paths: list[Path], root: Path = PKG.parent) -> list[tuple[str, str]]:
    """(file, imported module or module.name) for every import statement, relative ones made absolute."""
    found = []
    for path in paths:
        here = _module_name(path, root)
        package = here if path.name == "__init__.py" else here.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*parent, *([base] if base else [])])
                found += [(path.name, base)] + [(path.name, f"{base}.{a.name}") for a in node.names]
    return found


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _offending(paths: list[Path], others: tuple[str, ...], root: Path = PKG.parent) -> list[tuple[str, str]]:
    return [(f, m) for f, m in _imports(paths, root) if _within(m, others)]


def _files(*parts: str) -> list[Path]:
    target = PKG.joinpath(*parts)
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


def test_msam_imports_no_other_family():
    msam = _files("models", "msam")
    assert PKG / "models" / "msam" / "module.py" in msam
    assert _offending(msam, SAUTOMED_FAMILY + BASELINES) == []


def test_no_other_family_imports_msam():
    others = [
        *_files("models", "sautomed"),
        *_files("module.py"),
        *_files("inference.py"),  # 3D-SAutoMed's slice-chain engine
        *_files("models", "baselines"),
    ]
    assert all(p.is_file() for p in others)
    assert _offending(others, (MSAM,)) == []


def test_the_scan_sees_imports_absolute_and_relative(tmp_path):
    names = {m for _, m in _imports(_files("models", "msam"))}
    assert "sautomed.models.sam.upstream" in names and "sautomed.models.msam.network" in names
    probe = tmp_path / "sautomed" / "models" / "msam" / "probe.py"  # a file of a copy of the layout
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "from ..sautomed import network\nfrom . import mea\nfrom ...module import SAutoMedModule\n"
    )
    found = [m for _, m in _imports([probe], root=tmp_path)]
    assert "sautomed.models.sautomed.network" in found and "sautomed.models.msam.mea" in found
    assert "sautomed.module.SAutoMedModule" in found
    assert len(_offending([probe], SAUTOMED_FAMILY, tmp_path)) == 4  # both imports, as module and name


def _loaded_by(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.startswith('sautomed'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_msam_loads_no_other_family():
    msam = [_module_name(p) for p in _files("models", "msam")]
    loaded = _loaded_by(msam)
    assert "sautomed.models.msam.module" in loaded
    assert [m for m in loaded if _within(m, SAUTOMED_FAMILY + BASELINES)] == []


def test_importing_3d_sautomed_loads_no_msam():
    modules = [_module_name(p) for p in _files("models", "sautomed")] + ["sautomed.module"]
    loaded = _loaded_by(modules)
    assert "sautomed.module" in loaded
    assert [m for m in loaded if _within(m, (MSAM,))] == []
