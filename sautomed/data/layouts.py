"""Dataset layouts: where a dataset keeps its images and labels, and how its label values map to classes.

``get_layout(name, root, label_map=None)`` returns a :class:`Layout` (a small picklable value); its
``cases()`` lists the cases and ``load(case)`` reads one as canonical arrays (see :mod:`sautomed.data.io`).

Discovery rules (a folder where some images have a label and others do not reports the unlabelled ones as
orphans, and ``cases()`` raises :class:`DatasetError` naming them; where no image has a label, e.g. a test
set, every case has ``label=None``):

- ``btcv``: ``root/img/imgXXXX.nii.gz`` + ``root/label/labelXXXX.nii.gz``, case id ``XXXX``; the 13 BTCV
  organs map to the paper's 8, others to background. Without ``img/`` and ``label/``, ``root`` must hold one
  image + label pair: the label is the volume file whose name contains ``label``, ``seg``, ``gt`` or ``mask``,
  the image the single other volume file (e.g. ``real-ct``: ``ct.nii.gz`` + ``totalseg_labels.nii.gz``); the
  case id is the folder name.
- ``chaos``: CHAOS ``Train_Sets/CT/<id>/DICOM_anon`` + ``Ground/*.png`` (CT: liver) or
  ``Train_Sets/MR/<id>/T2SPIR/DICOM_anon`` + ``T2SPIR/Ground`` (MR T2-SPIR: liver, right kidney, left kidney,
  spleen). ``root`` may be the dataset top, ``Train_Sets``, ``Train_Sets/CT|MR`` or one patient folder; a
  root holding both CT and MR patients is an error (point it at ``CT`` or ``MR``). PNG slices are matched to
  DICOM slices by the files' content: the PNG with the k-th smallest number in its name is the DICOM file
  with the k-th smallest InstanceNumber (0020,0013), placed at that file's position in the series; PNG
  rows/columns are the DICOM rows/columns, no flip (checked on real CHAOS CT: mean HU in the liver 141).
- ``segthor``: ``Patient_XX/Patient_XX.nii.gz`` + ``Patient_XX/GT.nii.gz`` under ``root/train`` if it exists,
  else under ``root`` (a folder of patients), or ``root`` itself being one patient folder.
- ``nnunet`` (and MSD): ``dataset.json`` (labels ``{name: int}`` or MSD ``{"0": "background", ...}``,
  ``file_ending`` default ``.nii.gz``), ``imagesTr/CASE_0000<ending>`` (channel 0 is used) or MSD
  ``imagesTr/CASE<ending>``, ``labelsTr/CASE<ending>``; an MSD ``training`` list, when present, names the
  files. Label values are mapped to 1..C in the order of their declared values.
- ``folder``: every volume file and DICOM series sub-folder of ``root``, unlabelled (for prediction); a
  broken symbolic link there is an orphan.

A ``label_map`` JSON (``{"classes": {"1": name, ...}, "map": {source: target, ...}}``) overrides the class
names and map of any layout with labels; unmapped source values then become background.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from .io import (
    Geometry,
    VolumeError,
    dicom_series_files,
    dicom_tags,
    is_dicom_dir,
    is_volume_file,
    read_label_volume,
    read_volume,
    to_canonical,
    volume_stem,
)

LAYOUTS: tuple[str, ...] = ("btcv", "chaos", "segthor", "nnunet", "folder")

LabelMap = tuple[
    tuple[int, int, int], ...
]  # (low, high, target): source values low..high (inclusive) -> target

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
CHAOS_MR_CLASSES = ("liver", "right_kidney", "left_kidney", "spleen")
CHAOS_MR_MAP: LabelMap = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))  # PNG 63/126/189/252
CHAOS_CT_CLASSES = ("liver",)
CHAOS_CT_MAP: LabelMap = ((1, 255, 1),)  # PNG 255 (or 1-bit True)
SEGTHOR_CLASSES = ("esophagus", "heart", "trachea", "aorta")
_LABEL_WORDS = re.compile(r"(label|seg|gt|mask)", re.IGNORECASE)


class DatasetError(ValueError):
    """A dataset's files are missing or do not fit its layout; the message names them."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path  # file or DICOM folder
    label: Path | None  # file, or for CHAOS the Ground folder of PNGs


@dataclass(frozen=True)
class LoadedCase:
    case_id: str
    image: np.ndarray  # float32 (z, y, x) canonical, raw intensities
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

    # ---------------------------------------------------------------------------------- discovery
    def discover(self) -> Discovery:
        """All cases and orphans found under ``root``, without judging them (used by the data check)."""
        if not self.root.exists():
            raise DatasetError(f"{self.root}: dataset root does not exist")
        if self.root.is_dir() and not any(self.root.iterdir()):
            raise DatasetError(f"{self.root}: dataset root is empty")
        cases, orphans = _DISCOVER[self.name](self)
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
        """Read one case: float32 image and uint8 mapped label, canonical (z, y, x)."""
        image, geom = read_volume(case.image)
        label = None
        if case.label is not None:
            label = self.remap(self.read_source_label(case, geom), str(case.label))
        return LoadedCase(case.case_id, image, label, geom)


# -------------------------------------------------------------------------------------- helpers


def _volumes(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_volume_file(p))


def _pair(images: dict[str, Path], labels: dict[str, Path], what: str) -> tuple[list[Case], list[Orphan]]:
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


def _btcv(layout: Layout) -> tuple[list[Case], list[Orphan]]:
    root = layout.root
    if (root / "img").is_dir():
        images = {re.sub(r"^img", "", volume_stem(p)): p for p in _volumes(root / "img")}
        labels = {}
        if (root / "label").is_dir():
            labels = {re.sub(r"^label", "", volume_stem(p)): p for p in _volumes(root / "label")}
        return _pair(images, labels, "btcv")
    files = _volumes(root)
    label_files = [p for p in files if _LABEL_WORDS.search(volume_stem(p))]
    image_files = [p for p in files if p not in label_files]
    if len(image_files) == 1 and len(label_files) <= 1:
        return [Case(root.name, image_files[0], label_files[0] if label_files else None)], []
    raise DatasetError(
        f"{root}: btcv layout needs img/ and label/ folders, or one image and one label file "
        f"(named *label*/*seg*/*gt*/*mask*); found {[p.name for p in files]}"
    )


def _segthor(layout: Layout) -> tuple[list[Case], list[Orphan]]:
    root = layout.root / "train" if (layout.root / "train").is_dir() else layout.root
    patients = (
        [root]
        if (root / f"{root.name}.nii.gz").is_file()
        else sorted(p for p in root.iterdir() if p.is_dir() and (p / f"{p.name}.nii.gz").is_file())
    )
    images = {p.name: p / f"{p.name}.nii.gz" for p in patients}
    labels = {p.name: p / "GT.nii.gz" for p in patients if (p / "GT.nii.gz").is_file()}
    return _pair(images, labels, "segthor")


def _nnunet(layout: Layout) -> tuple[list[Case], list[Orphan]]:
    root, ending = layout.root, layout.file_ending
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
    return _pair(images, labels, "nnunet")


def _folder(layout: Layout) -> tuple[list[Case], list[Orphan]]:
    cases, orphans = [], []
    for p in sorted(layout.root.iterdir()):
        if p.name.startswith("."):
            continue
        if is_volume_file(p) or is_dicom_dir(p):
            cases.append(Case(volume_stem(p), p, None))
        elif p.is_symlink() and not p.exists():  # reported, never skipped silently
            orphans.append(Orphan(volume_stem(p), p, "broken symbolic link"))
    return cases, orphans


def _chaos_patients(root: Path) -> dict[str, list[Path]]:
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


def _chaos(layout: Layout) -> tuple[list[Case], list[Orphan]]:
    patients = _chaos_patients(layout.root)[layout.modality]
    cases, orphans = [], []
    for p in patients:
        series = p / "DICOM_anon" if layout.modality == "CT" else p / "T2SPIR" / "DICOM_anon"
        ground = series.parent / "Ground"
        has_png = ground.is_dir() and any(g.suffix.lower() == ".png" for g in ground.iterdir())
        cases.append(Case(p.name, series, ground if has_png else None))
    if any(c.label for c in cases) and not all(c.label for c in cases):
        orphans = [
            Orphan(c.case_id, c.image, "chaos image without Ground PNGs") for c in cases if c.label is None
        ]
        cases = [c for c in cases if c.label is not None]
    return cases, orphans


_DISCOVER = {"btcv": _btcv, "chaos": _chaos, "segthor": _segthor, "nnunet": _nnunet, "folder": _folder}


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


# -------------------------------------------------------------------------------------- factory


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


def _nnunet_labels(root: Path) -> tuple[tuple[str, ...], LabelMap, str]:
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


def get_layout(name: str, root: str | Path, label_map: str | Path | None = None) -> Layout:
    """The :class:`Layout` ``name`` (one of :data:`LAYOUTS`) for the dataset at ``root``."""
    if name not in LAYOUTS:
        raise DatasetError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")
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
        names, mapping, ending = _nnunet_labels(root)
        layout = Layout(name, root, names, mapping, file_ending=ending)
    else:
        patients = _chaos_patients(root)
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
            layout.name, root, names, mapping, (), "background", layout.file_ending, layout.modality
        )
    return layout


def describe(layout: Layout) -> str:
    """One line naming the layout, its root and its classes (for logs and reports)."""
    classes = ", ".join(f"{i} {n}" for i, n in enumerate(layout.class_names, 1)) or "unlabelled"
    modality = f" ({layout.modality})" if layout.modality else ""
    return f"{layout.name} layout{modality} at {layout.root}: {classes}"
