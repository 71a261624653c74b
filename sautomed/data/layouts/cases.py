"""What discovery finds: cases, loaded cases, orphans; pairing images with labels by case id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import Geometry, is_volume_file

LabelMap = tuple[
    tuple[int, int, int], ...
]  # (low, high, target): source values low..high (inclusive) -> target


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path  # file or DICOM folder (channel 0)
    label: Path | None  # file, or for CHAOS the Ground folder of PNGs
    channels: tuple[Path, ...] = ()  # the files of channels 1.. (nnunet `_0001` ...) when more are read


@dataclass(frozen=True)
class LoadedCase:
    case_id: str
    image: np.ndarray  # float32 (z, y, x) canonical, raw intensities; (C, z, y, x) with C > 1 channels
    label: np.ndarray | None  # uint8 (z, y, x) canonical, values 0..C after the layout's label map
    geom: Geometry


@dataclass(frozen=True)
class Orphan:
    """A file that discovery found but could not pair (image without label, named-but-missing file, ...)."""

    case_id: str
    path: Path
    problem: str


@dataclass(frozen=True)
class Discovery:
    cases: tuple[Case, ...]  # sorted by case id; may hold duplicate ids (``Layout.cases`` refuses them)
    orphans: tuple[Orphan, ...]


def volumes_in(folder: Path) -> list[Path]:
    """The volume files directly in ``folder``, sorted, hidden files left out."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_volume_file(p))


def pair_by_id(
    images: dict[str, Path], labels: dict[str, Path], what: str
) -> tuple[list[Case], list[Orphan]]:
    """Pair images and labels by id; unlabelled images are orphans unless no image has a label."""
    cases, orphans = [], []
    for cid, path in labels.items():
        if cid not in images:
            orphans.append(Orphan(cid, path, f"{what} label without image"))
    for cid, path in images.items():
        if cid in labels:
            cases.append(Case(cid, path, labels[cid]))
        elif labels:
            orphans.append(Orphan(cid, path, f"{what} image without label"))
        else:
            cases.append(Case(cid, path, None))
    return cases, orphans
