"""nnU-Net v2 and MSD: `dataset.json` labels and file ending; `imagesTr/` + `labelsTr/` or named files.

Channels follow nnU-Net: ``case_0000`` is channel 0, ``case_0001`` channel 1 and so on, every channel on one
grid. A layout reading C channels pairs each case's first C channel files (:func:`discover_nnunet`);
:func:`read_channels` reads them into one (C, z, y, x) array and refuses channels on different grids.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import DatasetError, VolumeError
from ..io import Geometry, grid_mismatches, read_volume, volume_stem
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


CHANNEL = re.compile(r"^(.*)_(\d{4})$")


def nnunet_channel_names(root: Path) -> tuple[str, ...]:
    """The channel names ``dataset.json`` declares (``channel_names``, or MSD's ``modality``), in order."""
    spec = json.loads((root / "dataset.json").read_text())
    names = spec.get("channel_names") or spec.get("modality") or {}
    try:
        return tuple(str(names[k]) for k in sorted(names, key=int))
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{root / 'dataset.json'}: channel_names must map 0, 1, ... to names ({e})") from e


def discover_nnunet(root: Path, ending: str, channels: int = 1) -> tuple[list[Case], list[Orphan]]:
    """Images of ``imagesTr/`` with ``labelsTr/``, or the files an MSD ``training`` list names.

    With ``channels`` C > 1, each case is its ``_0000`` file with ``_0001`` .. ``_000{C-1}`` as
    ``Case.channels``; a case missing one of them is an orphan naming the file it lacks.
    """
    spec = json.loads((root / "dataset.json").read_text())
    if channels > 1:
        declared = nnunet_channel_names(root)
        if declared and len(declared) < channels:
            raise DatasetError(
                f"{root / 'dataset.json'}: {channels} channels asked for, the dataset declares "
                f"{len(declared)} ({', '.join(declared)})"
            )
    if spec.get("training"):  # MSD style: the files are named
        if channels > 1:
            raise DatasetError(
                f"{root}: {channels} channels need nnU-Net's imagesTr/case_0000, case_0001 ... files; "
                "an MSD training list (4D files) is not supported"
            )
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
    extra: dict[str, dict[int, Path]] = {}  # case id -> {channel k >= 1: file}
    for p in sorted(images_dir.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(ending):
            continue
        stem = p.name[: -len(ending)]
        channel = CHANNEL.match(stem)
        if channel is None:
            images[stem] = p  # MSD single modality
        elif int(channel.group(2)) == 0:
            images[channel.group(1)] = p
        else:
            extra.setdefault(channel.group(1), {})[int(channel.group(2))] = p
    labels = {}
    if labels_dir.is_dir():
        labels = {
            p.name[: -len(ending)]: p
            for p in sorted(labels_dir.iterdir())
            if p.name.endswith(ending) and not p.name.startswith(".")
        }
    cases, orphans = pair_by_id(images, labels, "nnunet")
    if channels == 1:
        return cases, orphans
    with_channels = []
    for case in cases:
        found = extra.get(case.case_id, {})
        missing = [k for k in range(1, channels) if k not in found]
        for k in missing:
            expected = images_dir / f"{case.case_id}_{k:04d}{ending}"
            orphans.append(Orphan(case.case_id, expected, f"channel {k} missing"))
        if not missing:
            with_channels.append(replace(case, channels=tuple(found[k] for k in range(1, channels))))
    return with_channels, orphans


def channel_files(path: Path, channels: int) -> tuple[Path, ...]:
    """The files of channels 1 .. C-1 beside a ``case_0000`` file (prediction); ``DatasetError`` if one is
    missing or ``path`` is not a ``_0000`` file."""
    path = Path(path)
    stem = volume_stem(path)
    ending = path.name[len(stem) :]
    match = CHANNEL.match(stem)
    if match is None or int(match.group(2)) != 0:
        raise DatasetError(
            f"{path}: a {channels}-channel model reads case_0000{ending} .. case_{channels - 1:04d}{ending}; "
            "this is not a _0000 file"
        )
    out = tuple(path.with_name(f"{match.group(1)}_{k:04d}{ending}") for k in range(1, channels))
    missing = [str(p) for p in out if not p.exists()]
    if missing:
        raise DatasetError(f"{path}: channel file missing beside it: {', '.join(missing)}")
    return out


def read_channels(paths: tuple[Path, ...]) -> tuple[np.ndarray, Geometry]:
    """Channel files on one grid -> float32 (C, z, y, x) canonical and the geometry of the first.

    A channel whose grid (size, spacing, origin, direction) differs from the first one's is a
    ``VolumeError`` naming both files and the difference; nothing is resampled.
    """
    first, geom = read_volume(paths[0])
    arrays = [first]
    for p in paths[1:]:
        image, g = read_volume(p)
        problems = grid_mismatches(g, geom)
        if problems or image.shape != first.shape:
            raise VolumeError(f"{p}: not on the grid of {paths[0]}: " + "; ".join(problems or ["shape"]))
        arrays.append(image)
    return np.stack(arrays), geom
