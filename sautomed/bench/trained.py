"""`sautomed bench --ckpt A.ckpt B.ckpt ...`: seconds a case for trained checkpoints of any family, one run.

Each checkpoint is loaded as ``sautomed predict`` loads it (its own family's module, its preprocessing, its
inference settings) and timed on one case, the checkpoints taking turns (``timing.time_interleaved``), so that
their ratios hold while other work on the machine comes and goes:

- ``load_s``: reading the checkpoint and building the module (once; not repeated);
- ``read_s``: reading and preprocessing the case (``PredictDataset``, as predict's data loader does);
- ``predict_s``: the module's ``predict_step`` on it, under ``torch.inference_mode`` as Lightning runs it:
  everything predict does for a case except writing the file (for the SAM path: encoder, chain, refiner);
- ``ensemble``: with two or more checkpoints of one input and one class list, their ``Ensemble`` (the mean
  of their class probabilities, what ``predict --ckpt_path A B`` runs) timed the same way; otherwise the
  one-line reason it cannot be formed.

``foreground_voxels`` of each result is recorded, so that a run shows what the models found on the case.
The case is ``--image`` (a ``case_0000`` file for models reading several channels: its siblings are read as
predict reads them) or, without it, a synthetic ``--case-slices`` x ``--out-size`` x ``--out-size`` volume
(1.5 x 1.5 x 5 mm; written to a temporary folder). A SAM chain's time depends on what it finds (its refiner
redraws each organ it finds on each slice), so a real case is the fairer measure.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sautomed.bench.report import machine_info
from sautomed.bench.timing import loadavg, time_interleaved
from sautomed.bench.workload import synthetic_volume
from sautomed.errors import UserError


@dataclass(frozen=True)
class TrainedBench:
    """What ``bench --ckpt`` measures: the checkpoints, the case and the timing settings."""

    checkpoints: tuple[Path, ...]
    image: Path | None = None
    ensemble: bool = True
    encoder_bf16: bool = False
    case_slices: int = 35
    out_size: int = 256
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    seed: int = 0


def _load(path: Path, encoder_bf16: bool) -> tuple[Any, str]:
    """The module predict would build from ``path`` (eval mode) and its family's name."""
    import dataclasses

    from sautomed.families import module_from_checkpoint
    from sautomed.run_folder import read_checkpoint

    ckpt = read_checkpoint(path)
    module = module_from_checkpoint(ckpt)
    if module.preprocessing is None:
        raise UserError(f"{path}: the checkpoint carries no preprocessing settings")
    inference = getattr(module, "inference", None)
    fields = {f.name for f in dataclasses.fields(inference)} if inference is not None else set()
    if encoder_bf16 and "encoder_bf16" in fields:  # the SAM path's encoder; other families run as they are
        module.inference = dataclasses.replace(inference, encoder_bf16=True)
    return module.eval(), str(ckpt["sautomed"].get("family"))


def write_synthetic_case(folder: Path, slices: int, size: int, channels: int, seed: int = 0) -> Path:
    """A synthetic ``case_0000.nii.gz`` (and its ``_0001`` .. siblings) of ``slices`` x ``size`` x ``size``
    voxels of 1.5 x 1.5 x 5 mm, intensities 0-1000: the stand-in case when no ``--image`` is given."""
    import SimpleITK as sitk

    for c in range(max(1, channels)):
        vol = synthetic_volume(slices, size, seed + c).numpy() * 1000.0
        image = sitk.GetImageFromArray(vol.astype(np.float32))
        image.SetSpacing((1.5, 1.5, 5.0))
        sitk.WriteImage(image, str(folder / f"synthetic_{c:04d}.nii.gz"))
    return folder / "synthetic_0000.nii.gz"


def _item(module: Any, image: Path, scratch: Path) -> Callable[[], dict[str, Any]]:
    """Reading and preprocessing ``image`` as predict's data loader does for ``module``."""
    from sautomed.data.datasets import PredictDataset
    from sautomed.data.preprocess import Preprocessing

    settings = module.preprocessing.items()
    pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings})
    channels = int(getattr(module, "input_channels", 1))
    dataset = PredictDataset([(image, scratch / "unused.nii.gz")], pre, channels)

    def read() -> dict[str, Any]:
        item = dataset[0]
        if "error" in item:
            raise UserError(f"{image}: {item['error']}")
        return item

    return read


def _predict(module: Any, item: dict[str, Any]) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        with torch.inference_mode():
            out = module.predict_step(item, 0)
        if "error" in out:
            raise UserError(f"{out['source']}: {out['error']}")
        return np.asarray(out["labels"])

    return run


def bench_trained(s: TrainedBench, progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Load, read and predict times of each checkpoint (and their ensemble) on one case; the record."""
    if not s.checkpoints:
        raise UserError("bench --ckpt needs at least one checkpoint")
    if s.repeats < 1 or s.warmup < 0:
        raise UserError("--repeats must be >= 1 and --warmup >= 0")
    if s.image is not None and not s.image.is_file():
        raise UserError(f"{s.image}: image not found")
    before = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _bench(s, progress)
    finally:
        torch.set_num_threads(before)


def _bench(s: TrainedBench, progress: Callable[[str], None]) -> dict[str, Any]:
    import time

    from sautomed.evaluation.ensemble import Ensemble

    rows: list[dict[str, Any]] = []
    modules = []
    for path in s.checkpoints:
        progress(f"loading {path}")
        t0 = time.perf_counter()
        module, family = _load(path, s.encoder_bf16)
        rows.append({"checkpoint": str(path), "family": family, "classes": list(module.class_names)})
        rows[-1]["load_s"] = time.perf_counter() - t0
        modules.append(module)
    r: dict[str, Any] = {
        **machine_info("cpu"),
        "repeats": s.repeats,
        "warmup": s.warmup,
        "encoder_bf16": s.encoder_bf16,
        "loadavg_before": loadavg(),
        "checkpoints": rows,
    }
    with tempfile.TemporaryDirectory(prefix="sautomed-bench-") as tmp:
        scratch = Path(tmp)
        channels = max(int(getattr(m, "input_channels", 1)) for m in modules)
        image = s.image or write_synthetic_case(scratch, s.case_slices, s.out_size, channels, s.seed)
        r["image"] = str(s.image) if s.image else f"synthetic {s.case_slices} x {s.out_size} x {s.out_size}"
        names = [f"m{k}" for k in range(len(modules))]
        readers = {n: _item(m, image, scratch) for n, m in zip(names, modules, strict=True)}
        progress("reading and preprocessing the case (in turns)")
        read = time_interleaved(readers, dict.fromkeys(names, s.repeats), s.warmup)
        predictors = {n: _predict(m, read[n]["result"]) for n, m in zip(names, modules, strict=True)}
        r["ensemble"] = None
        if s.ensemble and len(modules) > 1:
            try:
                ensemble = Ensemble(modules, [str(p) for p in s.checkpoints]).eval()
            except UserError as exc:
                r["ensemble"] = {"refused": str(exc)}
            else:
                predictors["ensemble"] = _predict(ensemble, read[names[0]]["result"])
                r["ensemble"] = {"checkpoints": [str(p) for p in s.checkpoints]}
        progress(f"predicting the case: {', '.join(predictors)} (in turns)")
        timed = time_interleaved(predictors, dict.fromkeys(predictors, s.repeats), s.warmup)
    shape = read[names[0]]["result"]["geom"].shape_zyx
    r["case_shape_zyx"] = [int(v) for v in shape]
    for n, row in zip(names, rows, strict=True):
        row["read_s"], row["read_all_s"] = read[n]["median"], read[n]["all"]
        row["predict_s"], row["predict_all_s"] = timed[n]["median"], timed[n]["all"]
        row["foreground_voxels"] = int((timed[n]["result"] > 0).sum())
    if "ensemble" in timed:
        r["ensemble"].update(
            read_s=rows[0]["read_s"],
            predict_s=timed["ensemble"]["median"],
            predict_all_s=timed["ensemble"]["all"],
            foreground_voxels=int((timed["ensemble"]["result"] > 0).sum()),
        )
    r["loadavg_after"] = loadavg()
    return r


def format_trained(r: dict[str, Any]) -> str:
    """The table ``bench --ckpt`` prints."""
    z, y, x = r["case_shape_zyx"]
    lines = [
        f"sautomed bench, trained checkpoints: one case ({r['image']}; {z} x {y} x {x} voxels), median of "
        f"{r['repeats']} after {r['warmup']}, in turns; {r['cpu']}, {r['threads']} threads"
        + (", encoder in bf16" if r["encoder_bf16"] else ""),
        f"load average before {r['loadavg_before']}, after {r['loadavg_after']}",
        f"{'checkpoint':44s} {'family':9s} {'load s':>7s} {'read s':>7s} {'predict s':>10s} "
        f"{'fg voxels':>10s}",
    ]
    for row in r["checkpoints"]:
        name = row["checkpoint"] if len(row["checkpoint"]) <= 44 else "..." + row["checkpoint"][-41:]
        lines.append(
            f"{name:44s} {row['family']:9s} {row['load_s']:7.2f} {row['read_s']:7.2f} "
            f"{row['predict_s']:10.2f} {row['foreground_voxels']:10d}"
        )
    ens = r.get("ensemble")
    if ens and "predict_s" in ens:
        lines.append(
            f"{'ensemble of the ' + str(len(ens['checkpoints'])) + ' (mean probabilities)':44s} {'':9s} "
            f"{'':7s} {ens['read_s']:7.2f} {ens['predict_s']:10.2f} {ens['foreground_voxels']:10d}"
        )
    elif ens and "refused" in ens:
        lines.append(f"no ensemble: {ens['refused']}")
    lines.append("predict s: the family's predict step on the preprocessed case (no process start, no write)")
    return "\n".join(lines)


def trained_settings(a: Any) -> TrainedBench:
    """``bench --ckpt`` settings from the parsed flags; the random-network flags are refused beside it."""
    clashing = [
        flag
        for flag, value in (
            ("--config", a.config),
            ("--model", a.model),
            ("--compare", a.compare),
            ("--compile", a.compile),
            ("--resume", a.resume),
        )
        if value
    ]
    if clashing:
        raise UserError(
            f"bench --ckpt times trained checkpoints; {', '.join(clashing)} belong to the random-network "
            "bench: one or the other"
        )
    if a.dtype == "bf16":
        raise UserError("bench --ckpt: --dtype fp32 or bf16-encoder (checkpoints run as predict runs them)")
    return TrainedBench(
        checkpoints=tuple(Path(p) for p in a.ckpt),
        image=a.image,
        ensemble=not a.no_ensemble,
        encoder_bf16=a.dtype == "bf16-encoder",
        case_slices=a.case_slices,
        out_size=a.out_size,
        repeats=a.repeats,
        warmup=a.warmup,
        threads=a.threads,
        seed=a.seed,
    )
