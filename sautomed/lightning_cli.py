"""fit / validate / test on LightningCLI, with the run folder's conventions (imported only by these commands,
so that `sautomed --help` and the tools start without Lightning)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from sautomed.cli import LIGHTNING_COMMANDS
from sautomed.errors import UserError
from sautomed.families import family_for_args
from sautomed.guards import check_encoder_finetune, weights_from_elsewhere
from sautomed.run_folder import (
    AtomicCheckpointIO,
    RunFolderConfig,
    earlier_checkpoints,
    resolve_ckpt_path,
    run_callbacks,
)
from sautomed.tools.report import ReportWriter


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


def run_lightning(argv: Sequence[str]) -> int:
    """Run `fit` / `validate` / `test`; a configuration the model refuses is a UserError, one line."""
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
