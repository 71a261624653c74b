"""Class probabilities saved beside a label map, and ensembles of saved probabilities.

`sautomed predict --save-probabilities` writes ``case.npz`` beside ``case.nii.gz``, as nnU-Net does:

- ``probabilities``: float16, (C+1, z, y, x) in the label file's stored array order (what
  ``SimpleITK.GetArrayFromImage`` gives for the written label map), background first;
- ``class_names``: the C+1 names, background first;
- ``labels_file``: the name of the label map it belongs to (its grid: spacing, origin, direction).

`sautomed ensemble -i A B ... -o OUT` averages the probabilities of the cases every folder holds, takes the
argmax and writes the labels on the grid of the first folder's label map (nnU-Net's ``nnUNetv2_ensemble``);
`sautomed crossval` scores ensembles of out-of-fold predictions the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from sautomed.data.io import Geometry, atomic_write, from_canonical, split_suffix
from sautomed.errors import UserError
from sautomed.evaluation.postprocess import keep_largest_component

SUFFIX = ".npz"


def probabilities_path(label_path: str | Path) -> Path:
    """``case.nii.gz`` -> ``case.npz`` beside it."""
    label_path = Path(label_path)
    base, _ = split_suffix(label_path)
    return label_path.with_name(base + SUFFIX)


def write_probabilities(
    probabilities: Any,
    geom: Geometry,
    class_names: Sequence[str],
    label_path: str | Path,
    overwrite: bool = False,
) -> Path:
    """Write canonical (Z, C+1, Y, X) probabilities (a tensor or an array) as ``case.npz`` beside the label
    map ``label_path``, in its stored array order; atomic."""
    probs = (
        probabilities.detach().float().cpu().numpy() if hasattr(probabilities, "detach") else probabilities
    )
    probs = np.asarray(probs, np.float32)
    names = ("background", *class_names)
    if (
        probs.ndim != 4
        or probs.shape[1] != len(names)
        or (probs.shape[0], *probs.shape[2:]) != tuple(geom.shape_zyx)
    ):
        raise ValueError(
            f"{label_path}: probabilities of shape {probs.shape} do not match {len(names)} classes on the "
            f"grid {geom.shape_zyx}"
        )
    stored = np.stack([from_canonical(probs[:, c], geom) for c in range(probs.shape[1])]).astype(np.float16)
    out = probabilities_path(label_path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                probabilities=stored,
                class_names=np.array(names),
                labels_file=np.array(Path(label_path).name),
            )

    return atomic_write(out, write, overwrite=overwrite)


@dataclass
class SavedProbabilities:
    probabilities: np.ndarray  # float16 (C+1, z, y, x), stored order
    class_names: tuple[str, ...]  # background first
    labels_file: Path  # the label map beside it


def read_probabilities(path: str | Path) -> SavedProbabilities:
    """Read a ``case.npz`` of ``predict --save-probabilities``; a ValueError naming the file if not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            probs, names, labels_file = z["probabilities"], z["class_names"], str(z["labels_file"])
    except KeyError as exc:
        raise ValueError(f"{path}: not a probabilities file of sautomed predict (no {exc})") from exc
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the probabilities ({exc})") from exc
    if probs.ndim != 4 or probs.shape[0] != len(names):
        raise ValueError(f"{path}: probabilities of shape {probs.shape} for {len(names)} class names")
    return SavedProbabilities(probs, tuple(str(n) for n in names), path.with_name(labels_file))


@dataclass
class EnsembleResult:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case, why)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (case, why): not in every folder


def ensemble_case(
    files: Sequence[Path], out: Path, overwrite: bool = False, keep_largest: Sequence[int] = ()
) -> Path:
    """Average the probabilities of ``files`` (one case, one per member), write the argmax labels to ``out``
    on the grid of the first member's label map (the largest 3D component alone of the label values in
    ``keep_largest``); ValueError naming the file that does not fit."""
    first = read_probabilities(files[0])
    total = first.probabilities.astype(np.float32)
    for f in files[1:]:
        other = read_probabilities(f)
        if other.class_names != first.class_names:
            raise ValueError(f"{f}: classes {other.class_names} differ from {files[0]}'s {first.class_names}")
        if other.probabilities.shape != first.probabilities.shape:
            raise ValueError(
                f"{f}: grid {other.probabilities.shape[1:]} differs from {files[0]}'s "
                f"{first.probabilities.shape[1:]}"
            )
        total += other.probabilities
    if not first.labels_file.is_file():
        raise ValueError(f"{files[0]}: its label map {first.labels_file} is missing (it carries the grid)")
    reference = sitk.ReadImage(str(first.labels_file))
    if reference.GetSize()[::-1] != first.probabilities.shape[1:]:
        raise ValueError(f"{files[0]}: its label map {first.labels_file} is on another grid")
    array = total.argmax(0).astype(np.uint8)
    if keep_largest:
        array = keep_largest_component(array, max(keep_largest), keep_largest)
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(reference)
    return atomic_write(out, lambda tmp: sitk.WriteImage(labels, str(tmp), True), overwrite=overwrite)


def ensemble_folders(
    folders: Sequence[Path],
    out_dir: Path,
    suffix: str = ".nii.gz",
    overwrite: bool = False,
    keep_largest: Sequence[int] = (),
) -> EnsembleResult:
    """Every case whose ``.npz`` each of ``folders`` holds, averaged and written to ``out_dir/case<suffix>``.
    A case missing from a folder is skipped and named; a case that fails is named and the rest go on."""
    if len(folders) < 2:
        raise UserError("an ensemble needs at least two folders of saved probabilities")
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: folder does not exist")
    result = EnsembleResult()
    cases: dict[str, list[Path]] = {}
    for folder in folders:
        for f in sorted(Path(folder).glob(f"*{SUFFIX}")):
            if not f.name.startswith("."):
                cases.setdefault(f.name[: -len(SUFFIX)], []).append(f)
    if not cases:
        raise UserError(
            f"{folders[0]}: no saved probabilities (*.npz): predict with --save-probabilities first"
        )
    for case, files in sorted(cases.items()):
        if len(files) != len(folders):
            have = {f.parent for f in files}
            lacking = [str(d) for d in folders if Path(d) not in have]
            result.skipped.append((case, f"no {case}{SUFFIX} in {', '.join(lacking)}"))
            continue
        out = Path(out_dir) / f"{case}{suffix}"
        if out.exists() and not overwrite:
            result.skipped.append((case, f"{out} exists (use --overwrite to replace it)"))
            continue
        try:
            result.written.append(ensemble_case(files, out, overwrite, keep_largest))
        except (ValueError, OSError, RuntimeError) as exc:
            result.failed.append((case, str(exc)))
    return result
