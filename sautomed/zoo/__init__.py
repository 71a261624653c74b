"""Trained models that ship with sautomed: `sautomed models` lists them, `predict --model NAME` runs one.

Each is a compact checkpoint (``SAutoMedModule.compact_checkpoint``: only what its fit trained, in float16;
the frozen LiteMedSAM encoder comes from ``sautomed weights litemedsam``) in this folder, described in
``models.json``: its data and licence, classes, the input it expects, the figures measured on cases it never
saw, and its model card in ``docs/models/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sautomed.errors import UserError

HERE = Path(__file__).resolve().parent


def registry() -> dict[str, dict[str, Any]]:
    """Name -> description of every shipped model (``models.json``)."""
    path = HERE / "models.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def model_path(name: str) -> Path:
    """The checkpoint file of the shipped model ``name``; a UserError listing the names otherwise."""
    models = registry()
    if name not in models:
        known = ", ".join(models) or "none"
        raise UserError(f"--model {name!r}: no such shipped model (sautomed models lists them: {known})")
    path = HERE / models[name]["file"]
    if not path.is_file():
        raise UserError(f"{path}: the shipped model's file is missing from this installation")
    return path


def named_weights(source: str) -> str:
    """The name of known weights (``litemedsam``) when ``source`` is a file with their bytes, else ``source``:
    a packed model then finds its frozen encoder where `sautomed weights NAME` puts it, on any machine."""
    from sautomed.models.sam.weights import NAMED_WEIGHTS, sha256_of

    path = Path(source)
    if source in NAMED_WEIGHTS or not path.is_file():
        return source
    digest = sha256_of(path)
    return next((name for name, spec in NAMED_WEIGHTS.items() if spec.sha256 == digest), source)


def models_main(argv: list[str]) -> int:
    """`sautomed models`: what is there; `sautomed models pack CKPT OUT`: a fit's checkpoint made compact."""
    if argv[:1] == ["pack"]:
        if len(argv) != 3:
            raise UserError("usage: sautomed models pack CKPT OUT (a fit with a frozen encoder)")
        import torch

        from sautomed.data.io import atomic_write
        from sautomed.models.sautomed.module import SAutoMedModule
        from sautomed.run_folder import read_checkpoint

        compact = SAutoMedModule.compact_checkpoint(read_checkpoint(argv[1]))
        compact["frozen_from"] = named_weights(compact["frozen_from"])
        compact["sautomed"]["network"]["sam_checkpoint"] = compact["frozen_from"]  # the refiner's weights too
        atomic_write(Path(argv[2]), lambda p: torch.save(compact, p))
        print(f"wrote {argv[2]} ({Path(argv[2]).stat().st_size / 2**20:.1f} MiB)")
        return 0
    if argv and argv[0] in ("-h", "--help"):
        print("usage: sautomed models            list the shipped models (sautomed predict --model NAME)")
        print("       sautomed models pack CKPT OUT  a fit with a frozen encoder as a compact checkpoint")
        return 0
    if argv:
        raise UserError(f"sautomed models: unknown argument {argv[0]!r} (none, or pack CKPT OUT)")
    models = registry()
    if not models:
        print("no shipped models")
    for name, m in models.items():
        print(f"{name}\n  {m['summary']}")
        for key in ("data", "licence", "classes", "input", "measured", "card"):
            value = ", ".join(m[key]) if isinstance(m.get(key), list) else m.get(key)
            print(f"  {key}: {value}")
    return 0
