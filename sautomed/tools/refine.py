"""`sautomed refine`: LiteMedSAM as published redraws the organs of label maps made by any tool.

For each image in ``-i`` and its label map in ``-s`` (matched by case id, nnU-Net's ``_0000`` dropped), each
class's largest 3D component gives a box on every slice it covers; LiteMedSAM segments each box
(``models/sam/refine.py``, the step ``predict --sam-refine`` applies to a model's own output), and the result
is written on the input's exact grid into ``-o`` with a ``labels.json``. The other tool finds the organs, SAM
draws them: it cannot add an organ the map lacks, nor slices beyond the organ's own.

Refined values: ``--classes`` (default: every value in the map); the others are kept as they are. Images are
normalised as the refiner expects: a CT window (``--window LOW HIGH``, Hounsfield units) or, without one, the
volume's 0.5-99.5 percentiles (MR); LiteMedSAM then scales each slice to [0, 1] itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sautomed.data.io import is_volume_file, read_label_volume, read_volume, volume_stem, write_label_volume
from sautomed.data.preprocess import Preprocessing, normalize, resize_slices
from sautomed.errors import UserError
from sautomed.evaluation.drawing import colour
from sautomed.evaluation.postprocess import logits_to_labels
from sautomed.models.sam.refine import PretrainedBoxRefiner
from sautomed.tools.errors import CASE_ERRORS, naming
from sautomed.tools.evaluate import match_predictions
from sautomed.tools.labels import LABELS_FILE, read_label_names, write_label_table


def refine_labels(
    image: np.ndarray,
    labels: np.ndarray,
    refiner: PretrainedBoxRefiner,
    pre: Preprocessing,
    values: Sequence[int],
) -> np.ndarray:
    """(Z, Y, X) image and label map -> the label map with the classes ``values`` redrawn by the refiner."""
    S = refiner.image_size
    values = [v for v in values if v > 0 and (labels == v).any()]
    if not values:
        return labels.copy()
    volume = torch.from_numpy(resize_slices(normalize(image, pre), S, nearest=False))  # (Z, S, S)
    small = resize_slices(labels.astype(np.int32), S, nearest=True)  # (Z, S, S)
    compact = np.zeros_like(small, dtype=np.int64)
    for k, v in enumerate(values, start=1):
        compact[small == v] = k
    onehot = (
        F.one_hot(torch.from_numpy(compact), len(values) + 1).permute(0, 3, 1, 2).float()
    )  # (Z, C+1, S, S)
    scores = refiner.scores(volume, onehot, len(values))
    drawn = logits_to_labels(scores, tuple(labels.shape[1:])).numpy()  # (Z, Y, X), values 0..C
    out = labels.copy()
    free = np.isin(labels, values) | (labels == 0)  # a class that is not refined keeps its voxels
    out[np.isin(labels, values)] = 0
    for k, v in enumerate(values, start=1):
        out[(drawn == k) & free] = v
    return out


def _label_names(args: argparse.Namespace) -> dict[int, str]:
    table = args.labels or (args.segmentations / LABELS_FILE)
    return read_label_names(table) if Path(table).is_file() else {}


def refine_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="sautomed refine", description=__doc__.splitlines()[0])
    p.add_argument("-i", "--images", required=True, type=Path, help="folder of image volumes")
    p.add_argument("-s", "--segmentations", required=True, type=Path, help="folder of label maps (any tool)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--weights", default="litemedsam", help="LiteMedSAM checkpoint (path, or litemedsam)")
    p.add_argument("--image-size", type=int, default=256, help="slice size S LiteMedSAM works at")
    p.add_argument("--margin", type=int, default=6, help="pixels of S added to each side of a box")
    p.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), help="CT window (HU)")
    p.add_argument("--classes", default=None, help="label values to redraw, e.g. 1,2,3 (default: all)")
    p.add_argument(
        "--labels", type=Path, default=None, help="label table (default: SEGMENTATIONS/labels.json)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    a = p.parse_args(argv)
    for folder in (a.images, a.segmentations):
        if not folder.is_dir():
            raise UserError(f"{folder}: not a folder")
    images = sorted(f for f in a.images.iterdir() if not f.name.startswith(".") and is_volume_file(f))
    cases = {volume_stem(f).removesuffix("_0000"): f for f in images}
    if not cases:
        raise UserError(f"{a.images}: holds no image volumes")
    matched, _ = match_predictions(a.segmentations, list(cases))
    missing = sorted(set(cases) - set(matched))
    chosen = [int(v) for v in a.classes.split(",")] if a.classes else None
    pre = (
        Preprocessing(a.image_size, "ct", tuple(a.window))
        if a.window
        else Preprocessing(a.image_size, "percentile")
    )
    names = _label_names(a)
    refiner = PretrainedBoxRefiner(a.weights, a.image_size, a.margin)
    a.output.mkdir(parents=True, exist_ok=True)
    failed, seen = [(str(cases[c]), "no label map with this case id") for c in missing], set()
    for case in sorted(matched):
        out = a.output / f"{case}.nii.gz"
        if out.exists() and not a.overwrite:
            print(f"kept existing {out} (--overwrite replaces it)")
            seen |= {int(v) for v in np.unique(read_label_volume(out)) if v > 0}
            continue
        try:
            image, geom = read_volume(cases[case])
            labels = read_label_volume(matched[case], reference=geom)
            values = chosen or sorted(int(v) for v in np.unique(labels) if v > 0)
            refined = refine_labels(image, labels, refiner, pre, values)
            write_label_volume(refined, geom, out, overwrite=a.overwrite)
            seen |= {int(v) for v in np.unique(refined) if v > 0}
            print(f"{case}: refined {len(values)} classes -> {out}")
        except CASE_ERRORS as exc:
            failed.append((str(cases[case]), naming(exc, matched[case])))
    values = sorted(seen | set(names))
    table = {
        "checkpoint": {"path": str(a.weights), "sha256": None},
        "family": "sam_refine",
        "labels": {"0": {"name": "background", "colour": list(colour(0))}}
        | {str(v): {"name": names.get(v, f"label_{v}"), "colour": list(colour(v))} for v in values},
    }
    write_label_table(a.output, table, overwrite=a.overwrite)
    for src, why in failed:
        print(f"sautomed refine: {src}: {why}")
    return 1 if failed else 0
