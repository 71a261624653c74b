"""The label table: label value -> class name and colour, written as ``labels.json`` beside predictions.

One fixed colour table (:data:`COLOURS`) is used everywhere a label is drawn (previews, DICOM-SEG), so a
class has the same colour in every output of a run. ``labels.json``::

    {"checkpoint": {"path": ".../best.ckpt", "sha256": "..."}, "family": "sautomed",
     "labels": {"0": {"name": "background", "colour": [0, 0, 0]},
                "1": {"name": "liver", "colour": [230, 25, 75]}, ...}}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sautomed.data.io import atomic_write
from sautomed.errors import UserError
from sautomed.evaluation.drawing import COLOURS, colour

__all__ = ["COLOURS", "LABELS_FILE", "LabelTableError", "colour"]

LABELS_FILE = "labels.json"


class LabelTableError(UserError):
    """A labels.json that cannot be read or does not fit; the message names the file."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def label_table(
    class_names: Sequence[str], checkpoint: str | Path | None = None, family: str | None = None
) -> dict[str, Any]:
    """The labels.json content for a model predicting values 1..C for ``class_names`` (0 = background)."""
    labels = {"0": {"name": "background", "colour": list(colour(0))}}
    for value, name in enumerate(class_names, start=1):
        labels[str(value)] = {"name": str(name), "colour": list(colour(value))}
    ckpt = None
    if checkpoint is not None:
        path = Path(checkpoint).resolve()
        ckpt = {"path": str(path), "sha256": file_sha256(path)}
    return {"checkpoint": ckpt, "family": family, "labels": labels}


def _dump(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=2) + "\n"


def write_label_table(out_dir: str | Path, table: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``out_dir/labels.json`` atomically; an existing different one is kept unless ``overwrite``.

    Raises LabelTableError when the folder already holds a labels.json of another model (other classes or
    another checkpoint) and ``overwrite`` is False: predictions of two models would then share one table.
    """
    out = Path(out_dir) / LABELS_FILE
    text = _dump(table)
    if out.exists() and not overwrite:
        try:
            existing = json.loads(out.read_text())
        except (OSError, ValueError) as exc:
            raise LabelTableError(f"{out}: cannot read the existing label table ({exc})") from exc
        if _same_model(existing, table):
            return out  # the same classes from the same checkpoint bytes (wherever it lies now): kept
        raise LabelTableError(
            f"{out}: the folder holds predictions of another model or class table; "
            "predict into another --output folder, or pass --overwrite"
        )
    return atomic_write(out, lambda p: p.write_text(text))


def _same_model(a: Any, b: dict[str, Any]) -> bool:
    def sha(t: Any) -> Any:
        return (t.get("checkpoint") or {}).get("sha256") if isinstance(t, dict) else None

    return isinstance(a, dict) and a.get("labels") == b.get("labels") and sha(a) == sha(b)


def read_label_names(path: str | Path) -> dict[int, str]:
    """Foreground label value -> class name from a labels.json (or a plain ``{"1": "liver", ...}``).

    Accepts this module's format, a flat ``{value: name}`` map, and nnU-Net's ``{"labels": {name: value}}``.
    """
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LabelTableError(f"{path}: unreadable label table ({exc})") from exc
    raw = spec.get("labels", spec) if isinstance(spec, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise LabelTableError(f"{path}: a label table needs a 'labels' object of value: name")
    names: dict[int, str] = {}
    try:
        for key, entry in raw.items():
            if str(key).lstrip("-").isdigit():  # {value: name} or {value: {"name": ...}}
                value = int(key)
                name = entry["name"] if isinstance(entry, dict) else str(entry)
            else:  # nnU-Net {name: value}
                value, name = int(entry), str(key)
            if value != 0:
                names[value] = str(name)
    except (KeyError, TypeError, ValueError) as exc:
        raise LabelTableError(f"{path}: label table entry not understood ({exc})") from exc
    if len(set(names.values())) != len(names):
        raise LabelTableError(f"{path}: a class name appears for two label values")
    return names


def value_map(source: dict[int, str], target: dict[str, int], what: str) -> dict[int, int]:
    """Source label value -> target label value, matched by class name; unmatched names are an error."""
    missing = sorted(name for name in source.values() if name not in target)
    if missing:
        raise LabelTableError(f"{what}: classes {missing} are not among the target classes {sorted(target)}")
    return {value: target[name] for value, name in source.items()}
