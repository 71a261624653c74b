"""SegTHOR: ``Patient_XX/Patient_XX.nii.gz`` + ``Patient_XX/GT.nii.gz`` (under ``train/`` when present)."""

from __future__ import annotations

from pathlib import Path

from .cases import Case, Orphan, pair_by_id

SEGTHOR_CLASSES = ("esophagus", "heart", "trachea", "aorta")


def discover_segthor(root: Path) -> tuple[list[Case], list[Orphan]]:
    """The patient folders under ``root/train``, ``root``, or ``root`` itself being one."""
    root = root / "train" if (root / "train").is_dir() else root
    patients = (
        [root]
        if (root / f"{root.name}.nii.gz").is_file()
        else sorted(p for p in root.iterdir() if p.is_dir() and (p / f"{p.name}.nii.gz").is_file())
    )
    images = {p.name: p / f"{p.name}.nii.gz" for p in patients}
    labels = {p.name: p / "GT.nii.gz" for p in patients if (p / "GT.nii.gz").is_file()}
    return pair_by_id(images, labels, "segthor")
