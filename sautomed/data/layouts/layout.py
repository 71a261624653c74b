"""The :class:`Layout` value (how one dataset is stored): discovery, labels, loading; :func:`get_layout`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import DatasetError, VolumeError
from ..io import Geometry, read_label_volume, read_volume
from .btcv import BTCV_CLASSES, BTCV_MAP, discover_btcv
from .cases import Case, Discovery, LabelMap, LoadedCase, Orphan
from .chaos import (
    CHAOS_CT_CLASSES,
    CHAOS_CT_MAP,
    CHAOS_MR_CLASSES,
    CHAOS_MR_MAP,
    chaos_patients,
    discover_chaos,
    read_png_stack,
)
from .folder import discover_folder
from .nnunet import discover_nnunet, nnunet_labels, read_channels
from .segthor import SEGTHOR_CLASSES, discover_segthor

LAYOUTS: tuple[str, ...] = ("btcv", "chaos", "segthor", "nnunet", "folder")


@dataclass(frozen=True)
class Layout:
    """How one dataset is stored. Picklable; build it with :func:`get_layout`."""

    name: str  # btcv | chaos | segthor | nnunet | folder
    root: Path
    class_names: tuple[str, ...]  # foreground classes, index 1..C
    label_map: LabelMap  # (low, high, target) source ranges; 0 -> 0 always
    declared: tuple[int, ...] = ()  # further source values expected, mapped to background (BTCV's 13 organs)
    # other source values: "error" (a VolumeError on load, reported by the data check) or "background"
    unmapped: Literal["error", "background"] = "error"
    file_ending: str = ".nii.gz"  # nnunet
    modality: str = ""  # chaos: "CT" or "MR"
    channels: int = 1  # input channels read per case (nnunet `_0000`, `_0001`, ...; other layouts: 1)

    # ---------------------------------------------------------------------------------- discovery
    def discover(self) -> Discovery:
        """All cases and orphans found under ``root``, without judging them (used by the data check)."""
        if not self.root.exists():
            raise DatasetError(f"{self.root}: dataset root does not exist")
        if self.root.is_dir() and not any(self.root.iterdir()):
            raise DatasetError(f"{self.root}: dataset root is empty")
        cases, orphans = _discover(self)
        if not cases and not orphans:
            raise DatasetError(f"{self.root}: no {self.name} cases found")
        return Discovery(tuple(sorted(cases, key=lambda c: c.case_id)), tuple(orphans))

    def orphans(self) -> list[Orphan]:
        """Images without labels, labels without images and files named but missing."""
        return list(self.discover().orphans)

    def cases(self) -> list[Case]:
        """The cases sorted by id; :class:`DatasetError` on orphans or duplicate ids."""
        found = self.discover()
        problems = [f"{o.case_id}: {o.problem} ({o.path})" for o in found.orphans]
        ids = [c.case_id for c in found.cases]
        problems += [f"duplicate case id {i!r}" for i in sorted({i for i in ids if ids.count(i) > 1})]
        if problems:
            raise DatasetError(f"{self.root} ({self.name} layout): " + "; ".join(problems))
        return list(found.cases)

    # ---------------------------------------------------------------------------------- labels
    def unexpected_values(self, source: np.ndarray) -> list[int]:
        """Source label values that are neither background, mapped, nor declared."""
        values = np.unique(source)
        if self.unmapped == "background":
            return []
        known = (values == 0) | np.isin(values, self.declared)
        for low, high, _ in self.label_map:
            known |= (values >= low) & (values <= high)
        return [int(v) for v in values[~known]]

    def remap(self, source: np.ndarray, name: str = "") -> np.ndarray:
        """Source label values -> uint8 class indices 0..C; unexpected values are a VolumeError."""
        bad = self.unexpected_values(source)
        if bad:
            raise VolumeError(
                f"{name}: label values {bad[:10]} are not declared for the {self.name} layout "
                f"(classes {self.class_names})"
            )
        out = np.zeros(source.shape, np.uint8)
        for low, high, target in self.label_map:
            out[(source >= low) & (source <= high)] = target
        return out

    def read_source_label(self, case: Case, geom: Geometry) -> np.ndarray:
        """The case's label before mapping: canonical integer array on the image's grid."""
        if case.label is None:
            raise DatasetError(f"{case.case_id}: case has no label")
        if case.label.is_dir():
            return read_png_stack(case.label, case.image, geom)
        return read_label_volume(case.label, reference=geom)

    def load(self, case: Case) -> LoadedCase:
        """Read one case: float32 image and uint8 mapped label, canonical (z, y, x); with more than one
        channel the image is (C, z, y, x), its channels checked to share channel 0's grid."""
        if self.channels > 1:
            if len(case.channels) != self.channels - 1:
                raise DatasetError(
                    f"{case.case_id}: {self.channels} channels expected, the case has "
                    f"{len(case.channels) + 1}"
                )
            image, geom = read_channels((case.image, *case.channels))
        else:
            image, geom = read_volume(case.image)
        label = None
        if case.label is not None:
            label = self.remap(self.read_source_label(case, geom), str(case.label))
        return LoadedCase(case.case_id, image, label, geom)


def _discover(layout: Layout) -> tuple[list[Case], list[Orphan]]:
    """The layout family's discovery on the layout's root."""
    if layout.name == "btcv":
        return discover_btcv(layout.root)
    if layout.name == "chaos":
        return discover_chaos(layout.root, layout.modality)
    if layout.name == "segthor":
        return discover_segthor(layout.root)
    if layout.name == "nnunet":
        return discover_nnunet(layout.root, layout.file_ending, layout.channels)
    return discover_folder(layout.root)


def _read_label_map_json(path: Path) -> tuple[tuple[str, ...], LabelMap]:
    try:
        spec = json.loads(Path(path).read_text())
        classes = {int(k): str(v) for k, v in spec["classes"].items()}
        mapping = {int(k): int(v) for k, v in spec["map"].items()}
    except (OSError, KeyError, ValueError, AttributeError) as e:
        raise DatasetError(
            f"{path}: label map JSON needs 'classes' {{index: name}} and 'map' {{source: target}} ({e})"
        ) from e
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise DatasetError(f"{path}: class indices must be 1..C, got {sorted(classes)}")
    if any(t < 0 or t > len(classes) for t in mapping.values()):
        raise DatasetError(f"{path}: map targets must be 0..{len(classes)}")
    names = tuple(classes[i] for i in range(1, len(classes) + 1))
    return names, tuple((s, s, t) for s, t in sorted(mapping.items()))


def get_layout(name: str, root: str | Path, label_map: str | Path | None = None, channels: int = 1) -> Layout:
    """The :class:`Layout` ``name`` (one of :data:`LAYOUTS`) for the dataset at ``root``, reading
    ``channels`` input channels per case (more than one: the nnunet layout only)."""
    if name not in LAYOUTS:
        raise DatasetError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    if channels < 1 or (channels > 1 and name != "nnunet"):
        raise DatasetError(
            f"{root}: {channels} input channels asked for; the {name} layout has one "
            "(several channels: the nnunet layout's case_0000, case_0001 ... files)"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
    if name == "folder":
        return Layout(name, root, (), ())
    if name == "btcv":
        layout = Layout(name, root, BTCV_CLASSES, BTCV_MAP, declared=tuple(range(14)))
    elif name == "segthor":
        layout = Layout(name, root, SEGTHOR_CLASSES, tuple((v, v, v) for v in range(1, 5)))
    elif name == "nnunet":
        names, mapping, ending = nnunet_labels(root)
        layout = Layout(name, root, names, mapping, file_ending=ending, channels=channels)
    else:
        patients = chaos_patients(root)
        modalities = [m for m in ("CT", "MR") if patients[m]]
        if len(modalities) != 1:
            what = "both CT and MR patients" if modalities else "no CHAOS patient folders"
            raise DatasetError(
                f"{root}: chaos root holds {what}; point it at Train_Sets/CT, Train_Sets/MR "
                "or one patient folder"
            )
        modality = modalities[0]
        classes, mapping = (
            (CHAOS_CT_CLASSES, CHAOS_CT_MAP) if modality == "CT" else (CHAOS_MR_CLASSES, CHAOS_MR_MAP)
        )
        layout = Layout(name, root, classes, mapping, modality=modality)
    if label_map is not None:
        names, mapping = _read_label_map_json(Path(label_map))
        layout = Layout(
            layout.name, root, names, mapping, (), "background", layout.file_ending, layout.modality, channels
        )
    return layout


def describe(layout: Layout) -> str:
    """One line naming the layout, its root and its classes (for logs and reports)."""
    classes = ", ".join(f"{i} {n}" for i, n in enumerate(layout.class_names, 1)) or "unlabelled"
    modality = f" ({layout.modality})" if layout.modality else ""
    return f"{layout.name} layout{modality} at {layout.root}: {classes}"
