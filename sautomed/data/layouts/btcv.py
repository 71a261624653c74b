"""BTCV (Synapse): ``img/`` + ``label/`` by number, or one image + label pair; 13 organs -> the paper's 8."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DatasetError
from ..io import volume_stem
from .cases import Case, LabelMap, Orphan, pair_by_id, volumes_in

BTCV_CLASSES = (
    "spleen",
    "right_kidney",
    "left_kidney",
    "gallbladder",
    "liver",
    "stomach",
    "aorta",
    "pancreas",
)
BTCV_MAP: LabelMap = (
    (1, 1, 1),
    (2, 2, 2),
    (3, 3, 3),
    (4, 4, 4),
    (6, 6, 5),
    (7, 7, 6),
    (8, 8, 7),
    (11, 11, 8),
)
_LABEL_WORDS = re.compile(r"(label|seg|gt|mask)", re.IGNORECASE)


def discover_btcv(root: Path) -> tuple[list[Case], list[Orphan]]:
    """``root/img`` + ``root/label`` by number, or one image + label pair in ``root`` (case id: its name)."""
    if (root / "img").is_dir():
        images = {re.sub(r"^img", "", volume_stem(p)): p for p in volumes_in(root / "img")}
        labels = {}
        if (root / "label").is_dir():
            labels = {re.sub(r"^label", "", volume_stem(p)): p for p in volumes_in(root / "label")}
        return pair_by_id(images, labels, "btcv")
    files = volumes_in(root)
    label_files = [p for p in files if _LABEL_WORDS.search(volume_stem(p))]
    image_files = [p for p in files if p not in label_files]
    if len(image_files) == 1 and len(label_files) <= 1:
        return [Case(root.name, image_files[0], label_files[0] if label_files else None)], []
    raise DatasetError(
        f"{root}: btcv layout needs img/ and label/ folders, or one image and one label file "
        f"(named *label*/*seg*/*gt*/*mask*); found {[p.name for p in files]}"
    )
