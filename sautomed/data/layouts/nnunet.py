"""nnU-Net v2 and MSD: `dataset.json` labels and file ending; `imagesTr/` + `labelsTr/` or named files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import DatasetError
from ..io import volume_stem
from .cases import Case, LabelMap, Orphan, pair_by_id


def nnunet_labels(root: Path) -> tuple[tuple[str, ...], LabelMap, str]:
    """Class names, label map (declared values -> 1..C in order) and file ending from dataset.json."""
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{root}: nnunet layout needs a dataset.json")
    try:
        spec = json.loads(path.read_text())
        raw = spec["labels"]
        pairs = []
        for k, v in raw.items():
            if isinstance(v, (list, dict)):
                raise DatasetError(f"{path}: region-based label {k!r} is not supported")
            pairs.append((int(k), str(v)) if str(k).lstrip("-").isdigit() else (int(v), str(k)))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DatasetError(f"{path}: unreadable dataset.json labels ({e})") from e
    foreground = sorted((value, name) for value, name in pairs if value != 0)
    names = tuple(name for _, name in foreground)
    label_map = tuple((value, value, i + 1) for i, (value, _) in enumerate(foreground))
    return names, label_map, str(spec.get("file_ending", ".nii.gz"))


def discover_nnunet(root: Path, ending: str) -> tuple[list[Case], list[Orphan]]:
    """Channel-0 images of ``imagesTr/`` with ``labelsTr/``, or the files an MSD ``training`` list names."""
    spec = json.loads((root / "dataset.json").read_text())
    if spec.get("training"):  # MSD style: the files are named
        cases, orphans = [], []
        for entry in spec["training"]:
            image, label = root / entry["image"], root / entry["label"]
            cid = volume_stem(image)
            missing = [p for p in (image, label) if not p.exists()]
            if not missing:
                cases.append(Case(cid, image, label))
            for p in missing:
                orphans.append(Orphan(cid, p, "named in dataset.json but missing"))
        return cases, orphans
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: nnunet layout has no imagesTr/ folder")
    images: dict[str, Path] = {}
    for p in sorted(images_dir.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(ending):
            continue
        stem = p.name[: -len(ending)]
        channel = re.match(r"^(.*)_(\d{4})$", stem)
        if channel is None:
            images[stem] = p  # MSD single modality
        elif int(channel.group(2)) == 0:
            images[channel.group(1)] = p
    labels = {}
    if labels_dir.is_dir():
        labels = {
            p.name[: -len(ending)]: p
            for p in sorted(labels_dir.iterdir())
            if p.name.endswith(ending) and not p.name.startswith(".")
        }
    return pair_by_id(images, labels, "nnunet")
