"""The tool commands `sautomed` registers from this package (imported lazily: `--help` stays fast)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def cmd_evaluate(argv: Sequence[str]) -> int:
    from sautomed.tools.evaluate import evaluate_main

    return evaluate_main(argv)


def cmd_info(argv: Sequence[str]) -> int:
    from sautomed.tools.info import info_main

    return info_main(argv)


def cmd_export(argv: Sequence[str]) -> int:
    from sautomed.tools.export import export_main

    return export_main(argv)


def cmd_preview(argv: Sequence[str]) -> int:
    from sautomed.tools.preview import preview_main

    return preview_main(argv)


def cmd_report(argv: Sequence[str]) -> int:
    from sautomed.tools.report import report_main

    return report_main(argv)


def cmd_compare(argv: Sequence[str]) -> int:
    from sautomed.tools.compare import compare_main

    return compare_main(argv)


def cmd_refine(argv: Sequence[str]) -> int:
    from sautomed.tools.refine import refine_main

    return refine_main(argv)


def cmd_ensemble(argv: Sequence[str]) -> int:
    from sautomed.tools.ensemble import ensemble_main

    return ensemble_main(argv)


def cmd_crossval(argv: Sequence[str]) -> int:
    from sautomed.tools.crossval import crossval_main

    return crossval_main(argv)


def cmd_plan(argv: Sequence[str]) -> int:
    from sautomed.tools.plan import plan_main

    return plan_main(argv)


def cmd_models(argv: Sequence[str]) -> int:
    from sautomed.zoo import models_main

    return models_main(list(argv))


TOOL_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "evaluate": cmd_evaluate,
    "info": cmd_info,
    "export": cmd_export,
    "preview": cmd_preview,
    "report": cmd_report,
    "compare": cmd_compare,
    "refine": cmd_refine,
    "plan": cmd_plan,
    "ensemble": cmd_ensemble,
    "crossval": cmd_crossval,
    "models": cmd_models,
}

TOOL_HELP = """\
  models       the trained models that ship with sautomed (predict --model NAME)
  plan         a complete config from a dataset: --root DATASET [--family F] [--budget 20m] [--out C.yaml]
  evaluate     score label maps against references: --pred DIR --ref DIR [--layout L] [--out DIR]
  info         what a checkpoint holds (family, classes, preprocessing, training): info CKPT
  export       predictions in a challenge's format: --format chaos-png|segthor --pred P --out DIR
  preview      PNG of a label map over its image: --image IMG --labels LAB --out PNG
  report       report.html from a folder's metrics.csv and summary.json (test, evaluate): report DIR
  compare      several test runs' summary.json as one table: compare RUN_DIR...
  ensemble     average saved class probabilities of several predictions: -i PRED_A PRED_B -o OUT
  crossval     k-fold CV of configs and their ensembles, the winner named: --config A.yaml B.yaml --out DIR
  refine       LiteMedSAM redraws the organs of any tool's label maps: -i IMAGES -s SEGS -o OUT
"""
