"""Model families: which LightningModule and data module a config or a checkpoint means.

A config names its family the standard LightningCLI way, `model: {class_path: ..., init_args: {...}}`
(or `--model.class_path ...`); a config without a class_path is 3D-SAutoMed, as every config was before there
was a second family. A checkpoint names its family in `checkpoint["sautomed"]["family"]`, and `predict`
rebuilds the module from the checkpoint alone with that family's `from_checkpoint_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from sautomed.data.datamodule import SegmentationDataModule
from sautomed.models.baselines.datamodule import BaselineDataModule
from sautomed.models.baselines.module import FAMILY as BASELINE
from sautomed.models.baselines.module import BaselineModule
from sautomed.models.msam.module import FAMILY as MSAM
from sautomed.models.msam.module import MSAMModule
from sautomed.models.msam.patches import MSAMDataModule
from sautomed.models.sautomed.module import FAMILY as SAUTOMED
from sautomed.models.sautomed.module import SAutoMedModule
from sautomed.run_folder import UserError


@dataclass(frozen=True)
class Family:
    """A model family: its LightningModule (with `from_checkpoint_dict`) and the data module it trains on."""

    name: str
    module: type[L.LightningModule]
    datamodule: type[L.LightningDataModule]

    @property
    def class_path(self) -> str:
        return f"{self.module.__module__}.{self.module.__qualname__}"


FAMILIES: dict[str, Family] = {
    SAUTOMED: Family(SAUTOMED, SAutoMedModule, SegmentationDataModule),
    BASELINE: Family(BASELINE, BaselineModule, BaselineDataModule),
    MSAM: Family(MSAM, MSAMModule, MSAMDataModule),
}
DEFAULT = FAMILIES[SAUTOMED]


def _config_class_path(path: str) -> str | None:
    """`model.class_path` of a config file; None if it has none or is unreadable (LightningCLI says why)."""
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return model.get("class_path") if isinstance(model, dict) else None


def requested_class_path(argv: Sequence[str]) -> str | None:
    """The model class_path the arguments ask for: the last `--config` / `-c` naming one, or
    `--model.class_path`."""
    found = None
    for k, arg in enumerate(argv):  # in order, as LightningCLI applies them: a later one wins
        if arg in ("--config", "-c") and k + 1 < len(argv):
            found = _config_class_path(argv[k + 1]) or found
        elif arg.startswith(("--config=", "-c=")):
            found = _config_class_path(arg.split("=", 1)[1]) or found
        elif arg == "--model.class_path" and k + 1 < len(argv):
            found = argv[k + 1]
        elif arg.startswith("--model.class_path="):
            found = arg[len("--model.class_path=") :]
    return found


def family_for_class_path(class_path: str) -> Family:
    """The family whose module `class_path` names (its import path, or just the class name)."""
    for family in FAMILIES.values():
        if class_path in (family.class_path, family.module.__qualname__):
            return family
    known = ", ".join(f.class_path for f in FAMILIES.values())
    raise UserError(f"model.class_path {class_path!r} is not a sautomed model family; use one of: {known}")


def family_for_args(argv: Sequence[str]) -> tuple[Family, bool]:
    """(family, whether the config names it by class_path) for fit / validate / test arguments."""
    class_path = requested_class_path(argv)
    if class_path is None:
        return DEFAULT, False
    return family_for_class_path(class_path), True


def module_from_checkpoint(ckpt: dict[str, Any]) -> L.LightningModule:
    """Rebuild a module of the checkpoint's own family from the checkpoint alone."""
    name = (ckpt.get("sautomed") or {}).get("family")
    if name not in FAMILIES:
        known = ", ".join(FAMILIES)
        raise UserError(f"checkpoint of unknown model family {name!r}; this sautomed knows: {known}")
    return FAMILIES[name].module.from_checkpoint_dict(ckpt)


def with_inference_changes(module: L.LightningModule, changes: dict[str, Any]) -> Any:
    """The module's inference settings with `changes` (predict's flags); a UserError names a flag that does
    not apply to the checkpoint's family."""
    fields = {f.name for f in dataclasses.fields(module.inference)}
    wrong = sorted(set(changes) - fields)
    if wrong:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in wrong)
        raise UserError(f"{flags} does not apply to this checkpoint's model ({type(module).__name__})")
    return dataclasses.replace(module.inference, **changes)
