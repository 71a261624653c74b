"""The run folder (`--trainer.default_root_dir`): config.yaml, last.ckpt, best.ckpt, splits.json, metrics.

Checkpoints are written atomically (temporary file, then rename), so a run killed while saving never leaves a
torn `last.ckpt`; `--ckpt_path last` with nothing to resume is an error, never a silent fresh start.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sautomed.data.io import pid_alive
from sautomed.errors import UserError


class CheckpointMismatchError(UserError):
    """A checkpoint of another model family or configuration."""


def check_checkpoint_config(
    cfg: dict[str, Any] | None,
    family: str,
    network: dict[str, Any],
    non_structural: set[str],
    defaults: dict[str, Any] | None = None,
) -> None:
    """Refuse a checkpoint whose recorded config is not of `family` or whose network settings differ.

    Args:
        cfg: the checkpoint's `sautomed` entry (None when it has none).
        family: the model family loading it.
        network: the loading model's network settings (a dataclass's `asdict`).
        non_structural: settings that may differ (e.g. the SAM checkpoint path).
        defaults: the settings' defaults: a setting the checkpoint does not record (it was written before
            the setting existed) counts as its default, which is what that older version ran.

    Raises `CheckpointMismatchError` naming every differing setting.
    """
    if cfg is None:
        raise CheckpointMismatchError("not a sautomed checkpoint (no 'sautomed' config inside)")
    if cfg.get("family") != family:
        found = cfg.get("family")
        raise CheckpointMismatchError(f"checkpoint of model family {found!r}, expected {family!r}")
    theirs = {**(defaults or {}), **(cfg.get("network") or {})}
    diffs = [
        f"{k}: checkpoint {theirs.get(k)!r} vs config {network.get(k)!r}"
        for k in sorted(set(network) | set(theirs))
        if k not in non_structural and theirs.get(k) != network.get(k)
    ]
    if diffs:
        raise CheckpointMismatchError(
            "checkpoint was trained with another network configuration: " + "; ".join(diffs)
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's files are 0600


def _mkstemp_like_open(name: str, folder: Path) -> tuple[int, str]:
    """A temporary file `.<name>.<pid>.<random>.tmp` beside the target, with the permissions a plain open()
    would give; temporaries of `name` left by killed processes are removed first."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[^.]+\.tmp")
    for stale in folder.glob(f".{glob.escape(name)}.*.tmp"):
        match = pattern.fullmatch(stale.name)
        if match and not pid_alive(int(match.group(1))):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.fchmod(fd, _FILE_MODE)
    return fd, tmp


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, then os.replace."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _mkstemp_like_open(path.name, path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class RunFolderConfig(SaveConfigCallback):
    """Writes the resolved config atomically: a fit's to `<default_root_dir>/config.yaml` (replaced on
    resume), an evaluation's beside its outputs as `<stage>_config.yaml` (`test_config.yaml`), so that
    evaluating in a fit's run folder never replaces the record of the experiment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["overwrite"] = True
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        text = self.parser.dump(self.config, skip_none=False)
        stage = getattr(stage, "value", stage)  # a TrainerFn enum in some Lightning versions
        name = self.config_filename if stage == "fit" else f"{stage}_{self.config_filename}"
        fd, tmp = _mkstemp_like_open(name, root)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, root / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class RunFolderCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint writing into the run folder, which holds config.yaml and splits.json by design:
    Lightning's warning that the folder is not empty says nothing there (`earlier_checkpoints` does)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)


def earlier_checkpoints(root: str | Path) -> list[str]:
    """Names of the checkpoints an earlier run left in the run folder (a fresh fit replaces them)."""
    return [name for name in ("last.ckpt", "best.ckpt") if (Path(root) / name).is_file()]


def run_callbacks(root: str | Path) -> list[ModelCheckpoint]:
    """`last.ckpt` at every epoch end and `best.ckpt` by validation mean DSC, both in the run folder."""
    last = RunFolderCheckpoint(
        dirpath=root,
        filename="last",
        save_top_k=1,
        monitor=None,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    best = RunFolderCheckpoint(
        dirpath=root,
        filename="best",
        monitor="val/mean_dsc",
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    return [last, best]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU; a missing, truncated or corrupt file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message here suggests weights_only=False: not for us
        raise UserError(
            f"{path}: checkpoint is truncated or corrupt (not a PyTorch checkpoint of tensors and values)"
        ) from exc
    except Exception as exc:  # any failure to deserialise (torch raises RuntimeError, OSError, EOFError,
        # zipfile.BadZipFile, and IndexError / KeyError from its unpickler on garbage): a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: checkpoint is truncated or corrupt ({first})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path}: not a Lightning checkpoint (no state_dict)")
    if "sautomed" not in ckpt:
        raise UserError(f"{path}: not a sautomed checkpoint (it carries no sautomed config)")
    return ckpt


def resolve_ckpt_path(ckpt_path: str | None, root: str | Path, subcommand: str) -> str | None:
    """`last` -> `<root>/last.ckpt` if it exists, else a UserError; any path must be a readable checkpoint."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        candidate = Path(root) / "last.ckpt"
        if not candidate.is_file():
            raise UserError(
                f"--ckpt_path last: there is no {candidate} to resume from "
                f"(check --trainer.default_root_dir); refusing to start a fresh run silently"
            )
        ckpt_path = str(candidate)
    elif ckpt_path in ("best", "hpc", "registry") and subcommand == "fit":
        raise UserError(f"--ckpt_path {ckpt_path} is not supported by fit; use 'last' or a path")
    elif ckpt_path == "best":
        candidate = Path(root) / "best.ckpt"
        if not candidate.is_file():
            raise UserError(f"--ckpt_path best: there is no {candidate}")
        ckpt_path = str(candidate)
    read_checkpoint(ckpt_path)
    return ckpt_path
