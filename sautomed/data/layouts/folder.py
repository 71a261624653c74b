"""A plain folder: every volume file and DICOM series sub-folder, unlabelled (for prediction)."""

from __future__ import annotations

from pathlib import Path

from ..io import is_dicom_dir, is_volume_file, volume_stem
from .cases import Case, Orphan


def discover_folder(root: Path) -> tuple[list[Case], list[Orphan]]:
    """Cases of every volume and DICOM folder in ``root``; a broken symbolic link is an orphan."""
    cases, orphans = [], []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if is_volume_file(p) or is_dicom_dir(p):
            cases.append(Case(volume_stem(p), p, None))
        elif p.is_symlink() and not p.exists():  # reported, never skipped silently
            orphans.append(Orphan(volume_stem(p), p, "broken symbolic link"))
    return cases, orphans
