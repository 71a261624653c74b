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

from sautomed.errors import UserError
from sautomed.evaluation.probabilities import ensemble_folders, read_probabilities
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
    return p


def ensemble_main(argv: Sequence[str]) -> int:
    a = build_parser().parse_args(argv)
    if len(a.input) < 2:
        raise UserError("ensemble needs at least two folders (-i A B ...)")
    if a.output.resolve() in {p.resolve() for p in a.input}:
        raise UserError(f"{a.output}: the output folder is one of the inputs; choose another")
    result = ensemble_folders(a.input, a.output, a.suffix, a.overwrite)
    for case, why in result.skipped:
        print(f"note: skipped {case}: {why}", file=sys.stderr)
    for case, why in result.failed:
        print(f"sautomed: failed {case}: {why}", file=sys.stderr)
    if result.written:
        case = result.written[0].name[: -len(a.suffix)]
        names = read_probabilities(Path(a.input[0]) / f"{case}.npz").class_names
        write_label_table(a.output, label_table(names[1:], None, "ensemble"), overwrite=a.overwrite)
    print(f"wrote {len(result.written)} ensembled label maps to {a.output}", file=sys.stderr)
    return 1 if result.failed else 0
