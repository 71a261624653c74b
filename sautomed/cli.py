"""`sautomed` command line: fit / validate / test on LightningCLI, predict and the tools beside them.

    sautomed fit --config configs/btcv.yaml
    sautomed test --config configs/btcv.yaml --ckpt_path runs/btcv/best.ckpt
    sautomed predict --ckpt_path best.ckpt --input scans/ --output labels/
    sautomed check-data --layout nnunet --root DATA
    sautomed phantoms --out DIR --cases N --seed S
    sautomed bench --config configs/btcv.yaml --model vit_b --image-size 512

A user error exits non-zero with one line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sautomed.errors import UserError
from sautomed.tools.commands import TOOL_COMMANDS, TOOL_HELP

TOP_HELP = """usage: sautomed <command> [options]

Segment-Anything-based fully automatic 3D medical image segmentation (3D-SAutoMed).

commands:
  fit          train a model (LightningCLI): sautomed fit --config configs/btcv.yaml
  validate     evaluate the fold's validation cases: --config ... --ckpt_path CKPT
  test         evaluate every case of --data.root (or --data.test_root): --config ... --ckpt_path CKPT
  predict      segment NIfTI / NRRD / MHA files or DICOM series: --ckpt_path CKPT --input IN --output OUT
  check-data   check a dataset before training: --config CFG | --layout L --root DIR
  phantoms     write a synthetic labelled dataset (nnU-Net layout): --out DIR --cases N --seed S
  bench        speed and memory benchmark: --config CFG [--model vit_b] [--image-size 512]
  weights      fetch named pretrained weights into the cache: sautomed weights litemedsam [--out DIR]
{tools}

Run `sautomed <command> --help` for a command's options; `sautomed --debug <command> ...` shows the traceback
of an error that is otherwise reported in one line.
""".format(tools=TOOL_HELP.rstrip("\n"))

LIGHTNING_COMMANDS = ("fit", "validate", "test")
# the project's own error type (every deliberate refusal; data and checkpoint errors derive from it) and the
# environment's (missing files, permissions, a full disk: the message names the file). Anything else is a bug
# and shows its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)


def _lightning(argv: Sequence[str]) -> int:
    from sautomed.lightning_cli import run_lightning  # Lightning and the families: only for these commands

    return run_lightning(argv)


def _tool_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"sautomed {prog}", description=description)


def cmd_phantoms(argv: Sequence[str]) -> int:
    from sautomed.data.phantom import make_phantoms

    p = _tool_parser("phantoms", "Write a synthetic labelled dataset in nnU-Net layout.")
    p.add_argument("--out", required=True, type=Path, help="output folder (dataset.json, imagesTr, labelsTr)")
    p.add_argument("--cases", type=int, default=8, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    a = p.parse_args(argv)
    if a.cases < 1:
        raise UserError("--cases must be at least 1")
    out = make_phantoms(a.out, a.cases, a.seed)
    print(f"wrote {a.cases} phantom cases to {out}")
    return 0


def _layout_from_config(path: Path) -> tuple[str, str, str | None, int]:
    import yaml

    if not path.is_file():
        raise UserError(f"{path}: config not found")
    cfg = yaml.safe_load(path.read_text()) or {}
    data = (cfg.get("data") or {}).get("init_args", cfg.get("data") or {})
    if "root" not in data:
        raise UserError(f"{path}: the config has no data.root")
    return data.get("layout", "nnunet"), data["root"], data.get("label_map"), int(data.get("channels", 1))


def cmd_check_data(argv: Sequence[str]) -> int:
    from sautomed.data.check import check_dataset, format_report
    from sautomed.data.layouts import LAYOUTS, get_layout

    p = _tool_parser("check-data", "Check every case of a dataset; exit 0 when clean, 1 otherwise.")
    p.add_argument("--config", type=Path, help="a sautomed config: its data.layout / data.root are checked")
    p.add_argument("--layout", choices=LAYOUTS, help="dataset layout")
    p.add_argument("--root", type=Path, help="dataset root folder")
    p.add_argument("--label-map", type=Path, default=None, help="label map JSON (btcv layout)")
    p.add_argument(
        "--channels", type=int, default=None, help="input channels per case (nnunet _0000, _0001 ...)"
    )
    a = p.parse_args(argv)
    if a.config:
        layout, root, label_map, channels = _layout_from_config(a.config)
        layout = a.layout or layout
        root = a.root or root
        label_map = a.label_map or label_map
    elif a.layout and a.root:
        layout, root, label_map, channels = a.layout, a.root, a.label_map, 1
    else:
        raise UserError("check-data needs --config CFG, or --layout L and --root DIR")
    channels = a.channels or channels
    report = check_dataset(get_layout(layout, root, label_map, channels))
    print(format_report(report))
    return 0 if report.ok else 1


def cmd_predict(argv: Sequence[str]) -> int:
    from sautomed.predict import predict_main

    return predict_main(argv)


def cmd_weights(argv: Sequence[str]) -> int:
    from sautomed.models.sam.weights import weights_main

    return weights_main(list(argv))


def cmd_bench(argv: Sequence[str]) -> int:
    from sautomed.bench import bench_main

    return bench_main(argv)


TOOLS: dict[str, Callable[[Sequence[str]], int]] = {
    "predict": cmd_predict,
    "check-data": cmd_check_data,
    "phantoms": cmd_phantoms,
    "bench": cmd_bench,
    "weights": cmd_weights,
    **TOOL_COMMANDS,
}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    return " ".join(text.split())


def _format_warning(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    return f"warning: {message}\n"  # one line, the message names the file; no source excerpt


class _NoAdvertising(logging.Filter):
    """Drops Lightning's "💡 Tip: try installing ..." lines: advertising, not information about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


# Lightning's warnings that say nothing true or useful about a sautomed run (the causes that are ours are
# fixed: the run folder's checkpoints, the batch transfer, the default logger)
_NOT_OURS = (
    ".*does not have many workers.*",  # volumes are read in the main process by design
    "LightningCLI.s args parameter",  # `main(args)` is the tested entry point
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning on a newer torch: not the user's
    "Be aware that when using `ckpt_path`, callbacks",  # validate / test restore weights, not callbacks
)


def quiet_lightning() -> None:
    """Filter the warnings and info lines of Lightning that are not about the user's run."""
    for message in _NOT_OURS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _NoAdvertising) for f in target.filters):
            target.addFilter(_NoAdvertising())


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the `sautomed` console script; returns the exit code."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = bool(os.environ.get("SAUTOMED_DEBUG"))
    if argv and argv[0] == "--debug":  # `sautomed --debug CMD ...`: user errors with their traceback too
        debug, argv = True, argv[1:]
    if args is None:  # run as the program (not called from Python): warnings as one line each
        warnings.formatwarning = _format_warning
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_lightning()
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(TOP_HELP)
            return 0 if argv else 2
        cmd, rest = argv[0], argv[1:]
        if cmd in TOOLS:
            return TOOLS[cmd](rest)
        if cmd in LIGHTNING_COMMANDS:
            if cmd == "fit":
                from sautomed.tools.plan import planned_fit_arguments  # `fit --data.root D` alone: planned

                argv = planned_fit_arguments(argv)
            return _lightning(argv)
        raise UserError(f"unknown command {cmd!r}; commands: {', '.join([*LIGHTNING_COMMANDS, *TOOLS])}")
    except SystemExit as exc:  # argparse / jsonargparse: usage already printed
        if type(exc).__name__ == "SIGTERMException":  # Lightning's, on a scheduler's SIGTERM (preemption)
            print(
                "sautomed: stopped by SIGTERM; the run folder keeps its last complete checkpoint "
                "(--ckpt_path last resumes)",
                file=sys.stderr,
            )
            return 143
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"sautomed: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sautomed: interrupted", file=sys.stderr)
        return 130


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
