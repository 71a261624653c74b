"""`sautomed ensemble -i PRED_A PRED_B ... -o OUT`: average the class probabilities that
``sautomed predict --save-probabilities`` wrote into several folders (folds of one config, or configs of
different families with the same classes), take the argmax and write each case's labels on its input grid,
with a ``labels.json``. nnU-Net's ``nnUNetv2_ensemble``; ``predict --ckpt_path A B`` does the same in one pass
without saving.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sautomed.errors import UserError
from sautomed.evaluation.postprocess import resolve_classes
from sautomed.evaluation.probabilities import ensemble_folders
from sautomed.tools.labels import label_table, write_label_table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sautomed ensemble",
        description="Average the class probabilities that predict --save-probabilities saved in folders.",
    )
    p.add_argument(
        "-i", "--input", required=True, nargs="+", type=Path, help="folders of predict --save-probabilities"
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--suffix", default=".nii.gz", help="label map file ending (.nii.gz, .nrrd, .mha)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    p.add_argument(
        "--keep-largest",
        nargs="+",
        metavar="CLASS",
        default=None,
        help="keep only the largest 3D component of these classes (names, label values or all) after the "
        "argmax (`sautomed crossval` says which help on its folds)",
    )
    return p


def first_class_names(folders: Sequence[Path]) -> tuple[str, ...]:
    """The foreground class names of the first saved probabilities in ``folders[0]`` (UserError if none);
    only the names are read, not the probabilities."""
    for f in sorted(Path(folders[0]).glob("*.npz")):
        if not f.name.startswith("."):
            try:
                with np.load(f, allow_pickle=False) as z:
                    return tuple(str(n) for n in z["class_names"])[1:]
            except (ValueError, OSError, KeyError) as exc:
                raise UserError(f"{f}: not saved probabilities of sautomed predict ({exc})") from exc
    raise UserError(f"{folders[0]}: no saved probabilities (*.npz): predict with --save-probabilities first")


def ensemble_main(argv: Sequence[str]) -> int:
    a = build_parser().parse_args(argv)
    if len(a.input) < 2:
        raise UserError("ensemble needs at least two folders (-i A B ...)")
    if a.output.resolve() in {p.resolve() for p in a.input}:
        raise UserError(f"{a.output}: the output folder is one of the inputs; choose another")
    keep: tuple[int, ...] = ()
    if a.keep_largest:
        if not Path(a.input[0]).is_dir():
            raise UserError(f"{a.input[0]}: folder does not exist")
        try:
            keep = resolve_classes(a.keep_largest, first_class_names(a.input), "--keep-largest")
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    result = ensemble_folders(a.input, a.output, a.suffix, a.overwrite, keep)
    for case, why in result.skipped:
        print(f"note: skipped {case}: {why}", file=sys.stderr)
    for case, why in result.failed:
        print(f"sautomed: failed {case}: {why}", file=sys.stderr)
    if result.written:
        names = first_class_names(a.input)  # every written case's classes matched the first folder's
        write_label_table(a.output, label_table(names, None, "ensemble"), overwrite=a.overwrite)
    print(f"wrote {len(result.written)} ensembled label maps to {a.output}", file=sys.stderr)
    return 1 if result.failed else 0
