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

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from sautomed.families import family_for_args
from sautomed.guards import check_encoder_finetune, weights_from_elsewhere
from sautomed.run_folder import (
    AtomicCheckpointIO,
    RunFolderConfig,
    UserError,
    earlier_checkpoints,
    resolve_ckpt_path,
    run_callbacks,
)
from sautomed.tools.commands import TOOL_COMMANDS, TOOL_HELP
from sautomed.tools.report import ReportWriter

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


class SautomedCLI(LightningCLI):
    """LightningCLI with the run folder conventions: checkpoints, config and metrics in default_root_dir."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_COMMANDS}

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        root = config.get("default_root_dir") or "."
        if self.subcommand == "fit":
            callbacks = [*callbacks, *run_callbacks(root)]
        elif not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            config["enable_checkpointing"] = False  # validate / test save nothing, restore no callback state
        if self.subcommand in ("validate", "test"):
            callbacks = [*callbacks, ReportWriter()]  # report.html beside metrics.csv
        if config.get("logger") in (None, True):  # what Lightning would pick, without its notice about it
            config["logger"] = CSVLogger(save_dir=root)
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins = [*plugins, AtomicCheckpointIO()]
        config["plugins"] = plugins
        return super()._instantiate_trainer(config, callbacks)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then resolve and check `--ckpt_path` before anything is seeded, built or logged.

        `last` / `best` become `<default_root_dir>/last.ckpt` / `best.ckpt`; a missing, truncated or corrupt
        checkpoint is a UserError here, so the error is the only line the command prints. So is LoRA on a
        random encoder without a checkpoint to load (`guards.py`).
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand not in LIGHTNING_COMMANDS:
            return
        config = self.config[subcommand]
        root = config.get("trainer", {}).get("default_root_dir") or "."
        config["ckpt_path"] = resolve_ckpt_path(config.get("ckpt_path"), root, subcommand)
        network = (config.get("model") or {}).get("network")
        if network is not None and not config["ckpt_path"]:  # the module checks it too; here before seeding
            check_encoder_finetune(network.get("encoder_finetune"), network.get("sam_checkpoint"))

    def instantiate_classes(self) -> None:
        """With `--ckpt_path` the weights come from a trained checkpoint: construction guards that concern
        random initial weights (`guards.py`) do not apply."""
        subcommand = self.config.get("subcommand")
        if subcommand in LIGHTNING_COMMANDS and self.config[subcommand].get("ckpt_path"):
            with weights_from_elsewhere():
                super().instantiate_classes()
        else:
            super().instantiate_classes()

    def _parse_ckpt_path(self) -> None:
        # LightningCLI's version torch.loads the checkpoint to read `hyper_parameters` (sautomed checkpoints
        # carry none: the config travels under `sautomed`) and lets a corrupt file raise a traceback; the
        # checkpoint was already resolved and checked in `parse_arguments`.
        return

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand in ("validate", "test") and kwargs.get("ckpt_path") is None:
            logging.getLogger("sautomed").warning(
                "%s without --ckpt_path evaluates the model as configured (untrained weights)", subcommand
            )
        root = self.trainer.default_root_dir
        if subcommand == "fit" and kwargs.get("ckpt_path") is None and earlier_checkpoints(root):
            logging.getLogger("sautomed").warning(
                "fit starts afresh in %s over %s of an earlier run, which this run overwrites as it saves "
                "its own (--ckpt_path last resumes instead)",
                root,
                " and ".join(earlier_checkpoints(root)),
            )
        return kwargs


def _config_error(exc: ValueError) -> UserError | None:
    """The user's configuration error inside jsonargparse's ValueError, as one line; None for anything else.

    A model built from a `model.class_path` config that refuses its settings (a UserError in its __init__)
    reaches us wrapped: "Does not validate against any of the Union subtypes", with each subtype's error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if "Does not validate against any of the Union subtypes" not in text:
        return None
    reasons = [
        line.strip()[2:]
        for line in text.splitlines()
        if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line
    ]
    return UserError("; ".join(reasons) or text.strip().splitlines()[0])


def _lightning(argv: Sequence[str]) -> int:
    try:
        return _run_lightning(argv)
    except ValueError as exc:
        found = _config_error(exc)
        if found is None or found is exc:
            raise
        raise found from exc


def _run_lightning(argv: Sequence[str]) -> int:
    family, by_class_path = family_for_args(argv)  # no model.class_path: 3D-SAutoMed
    SautomedCLI(
        family.module,
        family.datamodule,
        subclass_mode_model=by_class_path,
        args=list(argv),
        save_config_callback=RunFolderConfig,
        seed_everything_default=0,
        trainer_defaults={
            "use_distributed_sampler": False,  # the data module shards itself, without padding duplicates
            "num_sanity_val_steps": 0,
            "default_root_dir": "runs/default",
        },
        parser_kwargs={"fit": {"default_config_files": []}},
    )
    return 0


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
