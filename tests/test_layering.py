"""The house rules of the layout, checked on every import (an AST scan, relative imports resolved) and on
what importing each family actually loads (transitive imports through shared code):

* a family is one folder under ``sautomed/models/`` and never imports another family;
* nothing under ``sautomed/models/`` imports the layers above it (``sautomed.tools``, ``sautomed.cli``,
  ``sautomed.predict``, ``sautomed.families``, ``sautomed.bench``);
* the shared evaluation (``sautomed.evaluation``) imports no family and no layer above it.

Only ``sautomed.families`` (the CLI's table) knows every family.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sautomed"
MSAM = "sautomed.models.msam"
SAUTOMED_FAMILY = ("sautomed.models.sautomed",)
BASELINES = ("sautomed.models.baselines",)
FAMILIES = {"msam": (MSAM,), "sautomed": SAUTOMED_FAMILY, "baselines": BASELINES}
ABOVE_MODELS = (
    "sautomed.tools",
    "sautomed.cli",
    "sautomed.predict",
    "sautomed.families",
    "sautomed.bench",
    "sautomed.demo",
)


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


def test_every_family_is_one_folder_that_imports_no_other_family():
    for name in FAMILIES:
        files = _files("models", name)
        assert PKG / "models" / name / "module.py" in files  # the family's LightningModule is in its folder
        others = tuple(p for other, pkgs in FAMILIES.items() if other != name for p in pkgs)
        assert _offending(files, others) == [], name


def test_models_never_import_the_layers_above_them():
    assert _offending(_files("models"), ABOVE_MODELS) == []


def test_the_shared_evaluation_imports_no_family_and_nothing_above():
    everything = ABOVE_MODELS + tuple(p for pkgs in FAMILIES.values() for p in pkgs)
    assert _offending(_files("evaluation"), everything) == []


def test_no_family_code_is_left_at_the_top_level():
    for moved in ("module.py", "losses.py", "inference.py", "boxes.py", "metrics.py", "postprocess.py"):
        assert not (PKG / moved).exists(), moved


def test_the_scan_sees_imports_absolute_and_relative(tmp_path):
    names = {m for _, m in _imports(_files("models", "msam"))}
    assert "sautomed.models.sam.upstream" in names and "sautomed.models.msam.network" in names
    probe = tmp_path / "sautomed" / "models" / "msam" / "probe.py"  # a file of a copy of the layout
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..sautomed import network\nfrom . import mea\nfrom ...tools import report\n")
    found = [m for _, m in _imports([probe], root=tmp_path)]
    assert "sautomed.models.sautomed.network" in found and "sautomed.models.msam.mea" in found
    assert "sautomed.tools.report" in found
    assert len(_offending([probe], SAUTOMED_FAMILY, tmp_path)) == 2  # the import, as module and name
    assert len(_offending([probe], ABOVE_MODELS, tmp_path)) == 2


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
    assert [m for m in loaded if _within(m, SAUTOMED_FAMILY + BASELINES + ABOVE_MODELS)] == []


def test_importing_3d_sautomed_loads_no_other_family():
    loaded = _loaded_by([_module_name(p) for p in _files("models", "sautomed")])
    assert "sautomed.models.sautomed.module" in loaded
    assert [m for m in loaded if _within(m, (MSAM,) + BASELINES + ABOVE_MODELS)] == []


def test_importing_the_baselines_loads_no_other_family():
    loaded = _loaded_by([_module_name(p) for p in _files("models", "baselines")])
    assert "sautomed.models.baselines.module" in loaded
    assert [m for m in loaded if _within(m, (MSAM,) + SAUTOMED_FAMILY + ABOVE_MODELS)] == []
