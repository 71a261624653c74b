"""`sautomed info CKPT`: what a checkpoint holds, in plain text (or JSON with ``--json``).

Family, classes, preprocessing and every other part of the config the checkpoint carries (``sautomed`` key,
see ``SegmentationModule.family_config``); training progress (epoch, step, learning rate); the validation
score its checkpoint callbacks recorded; and, from the run folder beside it, the ``config.yaml`` training
settings and a ``summary.json`` written by validate / test with this checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from sautomed.run_folder import read_checkpoint

_FIRST = ("family", "class_names", "preprocessing")


def _plain(value: Any) -> Any:
    """Tensors and tuples as plain JSON values."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _validation(ckpt: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Monitored scores recorded by the checkpoint callbacks (e.g. best val/mean_dsc)."""
    found = []
    for name, state in (ckpt.get("callbacks") or {}).items():
        if isinstance(state, Mapping) and state.get("monitor"):
            score = _plain(state.get("best_model_score"))
            found.append(
                {
                    "callback": str(name).split("{")[0],
                    "monitor": state["monitor"],
                    "best_score": score,
                    "best_model_path": state.get("best_model_path"),
                }
            )
    return found


def _init_args(section: Any) -> dict[str, Any]:
    """A config section's settings, unwrapping LightningCLI's ``class_path`` / ``init_args`` form."""
    if not isinstance(section, Mapping):
        return {}
    if "init_args" in section:
        return {"class_path": section.get("class_path"), **(section.get("init_args") or {})}
    return dict(section)


def _run_folder(path: Path, shown: set[str]) -> dict[str, Any]:
    """config.yaml training settings (less the ``shown`` parts the checkpoint carries) and a summary.json of
    this checkpoint, from the checkpoint's folder."""
    out: dict[str, Any] = {}
    config = path.parent / "config.yaml"
    if config.is_file():
        try:
            cfg = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            out["run_config_error"] = f"{config}: unreadable ({exc})"
        else:
            model, data = _init_args(cfg.get("model")), _init_args(cfg.get("data"))
            model = {k: v for k, v in model.items() if k not in shown}
            trainer = cfg.get("trainer") or {}
            out["run_config"] = {
                "file": str(config),
                "model": model,
                "trainer": {
                    k: trainer.get(k) for k in ("max_epochs", "max_steps", "precision", "accelerator")
                },
                "data": {
                    k: data.get(k)
                    for k in ("layout", "root", "fold", "folds", "batch_size", "windows", "augmentation")
                    if k in data
                },
                "seed_everything": cfg.get("seed_everything"),
            }
    summary = path.parent / "summary.json"
    if summary.is_file():
        try:
            blob = json.loads(summary.read_text())
        except (OSError, ValueError):
            blob = None
        ckpt = blob.get("checkpoint") if isinstance(blob, dict) else None
        if ckpt and Path(ckpt).resolve() == path.resolve():
            out["summary"] = {
                "file": str(summary),
                "mean_dsc": blob.get("mean_dsc"),
                "mean_hd95_mm": blob.get("mean_hd95_mm"),
                "num_cases": blob.get("num_cases"),
                "per_class_dsc": {k: v.get("dsc") for k, v in (blob.get("per_class") or {}).items()},
            }
    return out


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Everything `info` reports about the checkpoint at ``path``, as plain values."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    cfg = dict(ckpt["sautomed"])
    state = ckpt["state_dict"]
    lrs = [g.get("lr") for opt in ckpt.get("optimizer_states") or [] for g in opt.get("param_groups", [])]
    info: dict[str, Any] = {
        "checkpoint": str(path),
        "size_mb": round(path.stat().st_size / 2**20, 2),
        "family": cfg.get("family"),
        "classes": {str(i): n for i, n in enumerate(cfg.get("class_names") or [], start=1)},
        "preprocessing": _plain(cfg.get("preprocessing")),
        "config": _plain({k: v for k, v in cfg.items() if k not in _FIRST}),
        "training": {
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "learning_rate": lrs[0] if lrs else None,
            "lightning_version": ckpt.get("pytorch-lightning_version"),
            "parameters": int(sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))),
        },
        "validation": _validation(ckpt),
    }
    info.update(_run_folder(path, set(cfg)))
    return info


def _lines(value: Any, indent: str = "  ") -> list[str]:
    if isinstance(value, Mapping):
        out = []
        for k, v in value.items():
            if isinstance(v, Mapping) and v:
                out.append(f"{indent}{k}:")
                out += _lines(v, indent + "  ")
            else:
                out.append(f"{indent}{k}: {_scalar(v)}")
        return out
    return [f"{indent}{_scalar(value)}"]


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    return "-" if v is None else str(v)


def format_info(info: Mapping[str, Any]) -> str:
    """The plain-text report of :func:`checkpoint_info`."""
    out = [f"checkpoint: {info['checkpoint']} ({info['size_mb']} MB)", f"family: {info['family']}"]
    out.append("classes: " + (", ".join(f"{k} {v}" for k, v in info["classes"].items()) or "none recorded"))
    out.append("preprocessing:")
    out += _lines(info["preprocessing"] or {"(none recorded)": None})
    out.append("model config:")
    out += _lines(info["config"])
    out.append("training:")
    out += _lines(info["training"])
    out.append("validation:")
    if info["validation"]:
        for v in info["validation"]:
            out.append(
                f"  best {v['monitor']}: {_scalar(v['best_score'])} ({v['callback']}: {v['best_model_path']})"
            )
    else:
        out.append("  none recorded in the checkpoint")
    if "run_config" in info:
        run = dict(info["run_config"])
        out.append(f"run config ({run.pop('file')}):")
        out += _lines(run)
    if "run_config_error" in info:
        out.append(f"run config: {info['run_config_error']}")
    if "summary" in info:
        s = info["summary"]
        out.append(
            f"evaluation ({s['file']}): mean DSC {_scalar(s['mean_dsc'])}, mean HD95 "
            f"{_scalar(s['mean_hd95_mm'])} mm over {s['num_cases']} cases"
        )
        out += _lines(s["per_class_dsc"], "    ")
    return "\n".join(out)


def info_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="sautomed info", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a sautomed checkpoint (.ckpt)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    a = p.parse_args(argv)
    info = checkpoint_info(a.checkpoint)
    print(json.dumps(info, indent=2) if a.json else format_info(info))
    return 0
