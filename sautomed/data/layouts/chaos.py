"""CHAOS: CT (``DICOM_anon`` + ``Ground`` PNGs, liver) or MR T2-SPIR (four organs); PNGs matched to DICOM."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import VolumeError
from ..io import Geometry, dicom_series_files, dicom_tags, to_canonical
from .cases import Case, LabelMap, Orphan

CHAOS_MR_CLASSES = ("liver", "right_kidney", "left_kidney", "spleen")
CHAOS_MR_MAP: LabelMap = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))  # PNG 63/126/189/252
CHAOS_CT_CLASSES = ("liver",)
CHAOS_CT_MAP: LabelMap = ((1, 255, 1),)  # PNG 255 (or 1-bit True)


def chaos_patients(root: Path) -> dict[str, list[Path]]:
    """Patient folders under a CHAOS root, by modality."""

    def kind(p: Path) -> str | None:
        if (p / "DICOM_anon").is_dir() and (p / "Ground").is_dir():
            return "CT"
        if (p / "T2SPIR" / "DICOM_anon").is_dir():
            return "MR"
        return None

    found: dict[str, list[Path]] = {"CT": [], "MR": []}
    if kind(root):
        found[kind(root)].append(root)
        return found
    for top in (
        root,
        root / "Train_Sets",
        root / "CT",
        root / "MR",
        root / "Train_Sets" / "CT",
        root / "Train_Sets" / "MR",
    ):
        if top.is_dir():
            for p in sorted(top.iterdir()):
                if p.is_dir() and kind(p) and p not in found[kind(p)]:
                    found[kind(p)].append(p)
    return found


def discover_chaos(root: Path, modality: str) -> tuple[list[Case], list[Orphan]]:
    """The ``modality`` (CT or MR) patients under ``root``; unlabelled ones are orphans if others are not."""
    patients = chaos_patients(root)[modality]
    cases, orphans = [], []
    for p in patients:
        series = p / "DICOM_anon" if modality == "CT" else p / "T2SPIR" / "DICOM_anon"
        ground = series.parent / "Ground"
        has_png = ground.is_dir() and any(g.suffix.lower() == ".png" for g in ground.iterdir())
        cases.append(Case(p.name, series, ground if has_png else None))
    if any(c.label for c in cases) and not all(c.label for c in cases):
        orphans = [
            Orphan(c.case_id, c.image, "chaos image without Ground PNGs") for c in cases if c.label is None
        ]
        cases = [c for c in cases if c.label is not None]
    return cases, orphans


def read_png_stack(ground: Path, series: Path, geom: Geometry) -> np.ndarray:
    """CHAOS PNG masks as a canonical (z, y, x) array of PNG values on the DICOM series' grid.

    The PNG with the k-th smallest number in its name belongs to the DICOM file with the k-th smallest
    InstanceNumber; it is stored at that file's place in the series (slice-position order), PNG rows and
    columns being the DICOM rows and columns.
    """
    pngs = [p for p in Path(ground).iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")]
    numbered = []
    for p in pngs:
        digits = re.findall(r"\d+", p.stem)
        if not digits:
            raise VolumeError(f"{p}: PNG name holds no slice number")
        numbered.append((int(digits[-1]), p))
    numbered.sort()
    files = dicom_series_files(series)
    if len(numbered) != len(files):
        raise VolumeError(f"{ground}: {len(numbered)} PNG masks for {len(files)} DICOM slices in {series}")
    instances = []
    for f in files:
        tag = dicom_tags(f, ("0020|0013",)).get("0020|0013", "")
        instances.append(int(tag) if tag.lstrip("-").isdigit() else None)
    if None in instances or len(set(instances)) != len(instances):
        raise VolumeError(
            f"{series}: DICOM InstanceNumbers missing or repeated; PNG masks in {ground} "
            "cannot be matched to slices"
        )
    rank = {inst: k for k, inst in enumerate(sorted(instances))}
    cols, rows = geom.size[0], geom.size[1]
    stored = np.zeros((len(files), rows, cols), np.int16)  # numpy order of the series: (slice, row, column)
    for z, inst in enumerate(instances):
        png = numbered[rank[inst]][1]
        mask = np.asarray(Image.open(png).convert("L"))
        if mask.shape != (rows, cols):
            raise VolumeError(
                f"{png}: PNG is {mask.shape[1]}x{mask.shape[0]}, DICOM slices are {cols}x{rows}"
            )
        stored[z] = mask
    return to_canonical(stored, geom)
