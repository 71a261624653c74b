"""`sautomed plan`: a complete config from a dataset, as nnU-Net plans one: the user brings the data, the
tool chooses the rest and says what it chose.

It checks the dataset first (`check-data`: a broken case stops the plan, named), reads its fingerprint
(`data/fingerprint.py`: shapes, spacings, foreground intensities, class sizes, channel names; cached), and
starts from the shipped config of the family for the machine (on a CPU the LiteMedSAM start with its frozen,
cached encoder; on a GPU with an official SAM checkpoint, vit_b with LoRA as in the paper; the U-Nets;
M-SAM). From the fingerprint it sets the classes, the channels, the normalisation (CT: a window from the
foreground's 0.5-99.5 percentiles, as nnU-Net clips CT; otherwise each volume's own percentiles, taken inside
the scan where a quarter or more of it is constant background, as nnU-Net normalises inside the nonzero mask
of skull-stripped scans), the U-Nets'
patch and spacing, and the time budget. For the frozen, cached SAM encoder it times the encoder on this
machine and lowers the augmented copies until encoding the dataset fits a third of the budget, and says how
large the feature cache will be against the machine's memory (memory-mapped on disk above half of it); every
choice is printed and written as a comment in the config.
sautomed never flips left-right; sided class names are reported so that this is visible.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sautomed.data.check import check_dataset, format_report
from sautomed.data.fingerprint import Fingerprint, fingerprint
from sautomed.data.layouts import get_layout
from sautomed.errors import UserError
from sautomed.evaluation.tta import sided

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FAMILIES = ("sautomed", "unet2d", "unet3d", "msam")


def _template(family: str, device: str, sam_checkpoint: str | None) -> tuple[str, dict[str, Any]]:
    if family == "sautomed":
        name = "btcv.yaml" if device == "cuda" and sam_checkpoint not in (None, "litemedsam") else None
        name = name or "chaos_mr_litemedsam.yaml"
    else:
        name = {
            "unet2d": "unet2d_chaos_mr_small.yaml",
            "unet3d": "unet3d_chaos_mr_small.yaml",
            "msam": "msam_brats.yaml",
        }[family]
    path = CONFIGS / name
    if not path.is_file():
        raise UserError(
            f"{path}: the shipped config `sautomed plan` starts from is missing (a source checkout)"
        )
    return name, yaml.safe_load(path.read_text())


def _init_args(cfg: dict[str, Any]) -> dict[str, Any]:
    model = cfg.setdefault("model", {})
    return model.setdefault("init_args", {}) if "class_path" in model else model


def _seconds(budget: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([smh]?)", budget.strip())
    if not match:
        raise UserError(f"--budget {budget!r}: give minutes as 20m, hours as 2h or seconds as 900s")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "": 60}[match.group(2)]


def is_ct(fp: Fingerprint, modality: str | None) -> bool:
    if modality is not None:
        return modality.lower() == "ct"
    return any(name.strip().upper() == "CT" for name in fp.channel_names)


MASKED_SHARE = 0.25  # nnU-Net normalises inside the nonzero mask when cropping to it saves a quarter

ENCODE_SHARE = (
    0.35  # of the budget the frozen encoder's feature cache may take (the rest: pretraining, chain)
)


def encoder_seconds_per_slice(backbone: str, image_size: int, device: str) -> tuple[float, int]:
    """This machine's seconds per slice of the SAM encoder ``backbone`` at ``image_size`` (random weights:
    speed does not depend on them), the best of 2 timed batches of 4 slices after one warm-up; and the bytes
    of one slice's float16 features (what the feature cache stores)."""
    import time

    import torch

    from sautomed.models.sautomed.network import NetworkConfig, build_network

    net = build_network(NetworkConfig(backbone=backbone, image_size=image_size, num_classes=1)).eval()
    dev = torch.device(device if device == "cpu" or torch.cuda.is_available() else "cpu")
    net.to(dev)
    x = torch.rand(4, image_size, image_size, device=dev)
    best = math.inf
    with torch.no_grad():
        for k in range(3):
            t = time.perf_counter()
            features = net.encode(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if k:
                best = min(best, (time.perf_counter() - t) / 4)
    return best, int(features[0].numel()) * 2


def _busy() -> str | None:
    """A warning when other work was running while the encoder was timed (the load average over 1 minute
    above half the CPUs): the timing, and the copies chosen from it, are then pessimistic."""
    import os

    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return None
    if load <= 0.5 * cpus:
        return None
    return (
        f"warning: load average {load:.1f} on {cpus} CPUs while the encoder was timed: other work slows it; "
        "plan again on an idle machine for the copies it affords"
    )


def size_feature_cache(
    fp: Fingerprint,
    copies: int,
    image_size: int,
    budget_s: int,
    seconds_per_slice: float,
    bytes_per_slice: int,
    memory_bytes: int,
) -> tuple[int, list[str]]:
    """The augmented copies K whose encoding fits ``ENCODE_SHARE`` of the budget on this machine (at most the
    template's, at least 1), and notes: slices, the encoding's minutes, the cache's size against memory.

    The frozen encoder encodes every slice of every copy before the first step (``bytes_per_slice`` of
    float16 features each); a dataset of many cases at the template's K would spend the whole
    budget there, so K comes down (each copy is one fixed augmentation of every volume)."""
    slices = int(sum(shape[0] for shape in fp.shapes_zyx))
    fits = int(ENCODE_SHARE * budget_s / max(seconds_per_slice * slices, 1e-9))
    k = max(1, min(copies, fits))
    notes = [
        f"frozen encoder: {seconds_per_slice:.3f} s a slice at S = {image_size} measured here; "
        f"{slices} slices x {k} augmented copies = {slices * k * seconds_per_slice / 60:.1f} min of encoding "
        f"(data.windows.augmented_copies {k}"
        + (f", down from {copies} to stay inside {ENCODE_SHARE:.0%} of the budget)" if k < copies else ")")
    ]
    if fits < 1:
        notes.append(
            f"warning: even one copy needs {slices * seconds_per_slice / 60:.1f} min of encoding, over "
            f"{ENCODE_SHARE:.0%} of the {budget_s // 60}-min budget: give a longer --budget or a GPU"
        )
    cache = slices * k * bytes_per_slice
    half = memory_bytes // 2
    where = "in memory" if cache <= half else "memory-mapped on disk (over half the machine's memory)"
    notes.append(
        f"feature cache {cache / 2**30:.1f} GiB of this machine's {memory_bytes / 2**30:.0f} GiB: {where}"
    )
    return k, notes


def plan_config(
    fp: Fingerprint,
    family: str,
    budget_s: int,
    device: str,
    sam_checkpoint: str | None,
    modality: str | None = None,
    layout: str = "nnunet",
    measure: bool = True,
    memory_bytes: int | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The config for ``fp`` and the notes saying what was chosen and why (``measure``: time the encoder
    and measure a training step here; ``memory_bytes``: plan for that much memory instead of this machine's
    or its GPU's)."""
    name, cfg = _template(family, device, sam_checkpoint)
    notes = [f"started from configs/{name} (the shipped {family} config for a {device.upper()})"]
    model, data, trainer = _init_args(cfg), cfg.setdefault("data", {}), cfg.setdefault("trainer", {})
    C, channels = len(fp.class_names), max(1, len(fp.channel_names))
    data.update(layout=layout, root=fp.root)  # data.folds as the template has it
    for key in ("splits_file", "test_root", "cache_dir", "foreground_labels"):
        data.pop(key, None)
    notes.append(
        f"{len(fp.case_ids)} cases, {C} classes ({', '.join(fp.class_names)}), {channels} channel(s)"
    )
    median, spacing = fp.median_shape, fp.median_spacing
    notes.append(f"median shape (z, y, x) {list(median)}, median spacing {[round(s, 2) for s in spacing]} mm")
    pre = data.setdefault("preprocessing", {})
    if is_ct(fp, modality):
        lo, hi = fp.foreground_percentiles["0.5"], fp.foreground_percentiles["99.5"]
        pre.update(normalization="ct", window=[round(lo), round(hi)])
        notes.append(f"CT: window [{round(lo)}, {round(hi)}] HU, the foreground's 0.5-99.5 percentiles")
    else:
        pre.update(normalization="percentile", percentiles=[0.5, 99.5])
        pre.pop("window", None)
        share = float(np.median(fp.background_fractions)) if fp.background_fractions else 0.0
        if share >= MASKED_SHARE:
            pre["percentile_region"] = "foreground"
            notes.append(
                f"not CT: each volume scaled by its own 0.5-99.5 percentiles inside the scan ({share:.0%} of "
                "a case's voxels, the median, sit at its minimum: a masked or skull-stripped background)"
            )
        else:
            pre.pop("percentile_region", None)
            notes.append("not CT: each volume scaled by its own 0.5-99.5 percentiles")
    side = sided(fp.class_names)
    notes.append(
        f"sided classes ({', '.join(side)}): no left-right flips (nor in predict --tta)"
        if side
        else "no sided class names (predict --tta may flip left-right; training never does)"
    )
    rare = [n for n, k in zip(fp.class_names, fp.class_cases, strict=True) if k < len(fp.case_ids)]
    if rare:
        notes.append(f"classes absent from some cases: {', '.join(rare)}")
    S = int(pre.get("image_size", 128))
    if family == "sautomed":
        net = model.setdefault("network", {})
        net["num_classes"] = C
        if sam_checkpoint:
            net["sam_checkpoint"] = sam_checkpoint
        notes.append(f"backbone {net.get('backbone')}, encoder {net.get('encoder_finetune')}, S = {S}")
        windows = data.setdefault("windows", {})
        copies = int(windows.get("augmented_copies", 0))
        if measure and copies > 0 and net.get("encoder_finetune") == "frozen":
            from sautomed.models.sautomed.feature_cache import machine_memory_bytes

            speed, nbytes = encoder_seconds_per_slice(str(net.get("backbone")), S, device)
            windows["augmented_copies"], more = size_feature_cache(
                fp, copies, S, budget_s, speed, nbytes, machine_memory_bytes()
            )
            notes += more
            busy = _busy()
            if busy:
                notes.append(busy)
    elif family in ("unet2d", "unet3d"):
        unet = model.setdefault("unet", {})
        unet["num_classes"] = C
        inplane = [round(s * m / S, 3) for s, m in zip(spacing[1:], median[1:], strict=True)]
        if family == "unet2d":
            unet.update(patch_size=[S, S], spacing=inplane)
        else:
            patch = [min(16, max(4, median[0] // 4 * 4)), min(96, S), min(96, S)]
            unet.update(patch_size=patch, spacing=[round(spacing[0], 3), *inplane])
            data.setdefault("patches", {})["size"] = patch
            notes.append(f"3D patch {patch} at spacing {unet['spacing']} mm (slices resized to S = {S})")
            unet["in_channels"] = data["channels"] = channels
            if channels > 1:
                notes.append(f"{channels} input channels ({', '.join(fp.channel_names)})")
    else:  # msam: the whole foreground as one lesion class, every channel read
        model["foreground_labels"] = None
        model.setdefault("network", {})["in_channels"] = channels
        data["channels"] = channels
        notes.append(f"M-SAM: every label > 0 is the lesion; {channels} input channel(s)")
    if family != "sautomed" and measure:
        from sautomed.tools.memory import size_batch

        notes += size_batch(fp, family, model, data, S, channels, device, memory_bytes)
    trainer["max_time"] = f"00:{budget_s // 3600:02d}:{budget_s % 3600 // 60:02d}:{budget_s % 60:02d}"
    trainer["accelerator"] = device
    trainer["default_root_dir"] = f"runs/{Path(fp.root).name}_{family}"
    notes.append(
        f"budget {budget_s // 60} min on the {device.upper()} (trainer.max_time; the schedule ends inside it)"
    )
    return cfg, notes


def write_plan(cfg: dict[str, Any], notes: Sequence[str], out: Path, overwrite: bool = False) -> Path:
    """The config as YAML with the notes as its header comments, atomically; an existing file is kept."""
    from sautomed.data.io import atomic_write

    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; choose another --out or pass --overwrite")
    text = "# planned by `sautomed plan`:\n" + "".join(f"#   {n}\n" for n in notes)
    text += yaml.safe_dump(cfg, sort_keys=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda p: p.write_text(text))


def plan_dataset(
    root: Path,
    family: str = "sautomed",
    budget: str = "20m",
    device: str = "cpu",
    sam_checkpoint: str | None = None,
    modality: str | None = None,
    layout: str | None = None,
    memory_bytes: int | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Check, fingerprint and plan the dataset at ``root`` (layout: nnunet when it has a dataset.json)."""
    if family not in FAMILIES:
        raise UserError(f"--family {family!r}: one of {', '.join(FAMILIES)}")
    root = Path(root)
    layout = layout or ("nnunet" if (root / "dataset.json").is_file() else None)
    if layout is None:
        raise UserError(f"{root}: no dataset.json; give --layout (btcv, chaos, segthor, folder)")
    channels = 1
    if layout == "nnunet" and family in ("msam", "unet3d"):  # the families that read several channels
        from sautomed.data.layouts.nnunet import nnunet_channel_names

        channels = max(1, len(nnunet_channel_names(root)))
    found = get_layout(layout, root, None, channels)
    report = check_dataset(found)
    if not report.ok:
        print(format_report(report))
        raise UserError(f"{root}: the data check found errors (listed above): fix them, then plan")
    fp = fingerprint(found)
    return plan_config(
        fp, family, _seconds(budget), device, sam_checkpoint, modality, layout, memory_bytes=memory_bytes
    )


def plan_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="sautomed plan", description=__doc__.splitlines()[0])
    p.add_argument(
        "--root", required=True, type=Path, help="the dataset (nnU-Net: dataset.json, imagesTr, labelsTr)"
    )
    p.add_argument(
        "--layout", default=None, help="btcv, chaos, segthor, folder (default: nnunet, dataset.json)"
    )
    p.add_argument("--family", choices=FAMILIES, default="sautomed", help="what to train (default: sautomed)")
    p.add_argument("--budget", default="20m", help="training time, e.g. 20m, 2h (default: 20m)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where it will train")
    p.add_argument(
        "--sam-checkpoint", default=None, help="SAM weights: a path, or litemedsam (the CPU default)"
    )
    p.add_argument(
        "--modality", choices=("ct", "mr"), default=None, help="default: CT if a channel is named CT"
    )
    p.add_argument(
        "--memory",
        default=None,
        help="plan for this much memory, e.g. 16G (default: this machine's, or the GPU's with --device cuda)",
    )
    p.add_argument("--out", type=Path, default=None, help="the config to write (default: print it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a = p.parse_args(argv)
    from sautomed.tools.memory import memory_size

    memory = None if a.memory is None else memory_size(a.memory)
    cfg, notes = plan_dataset(
        a.root, a.family, a.budget, a.device, a.sam_checkpoint, a.modality, a.layout, memory
    )
    for n in notes:
        print(f"plan: {n}")
    if a.out is None:
        print(yaml.safe_dump(cfg, sort_keys=False))
    else:
        write_plan(cfg, notes, a.out, a.overwrite)
        print(f"plan: wrote {a.out}; train it with: sautomed fit --config {a.out}")
    return 0


def _value(argv: Sequence[str], flag: str) -> str | None:
    for k, arg in enumerate(argv):
        if arg == flag and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def planned_fit_arguments(argv: Sequence[str]) -> list[str]:
    """`fit --data.root DATASET` without a config: plan it, write the plan into the run folder, and return
    the arguments with `--config <plan>` first; any other `fit` arguments as they are."""
    argv = list(argv)
    if (
        not argv
        or argv[0] != "fit"
        or any(a in ("--config", "-c") or a.startswith(("--config=", "-c=")) for a in argv)
    ):
        return argv
    root = _value(argv, "--data.root")
    if root is None or any(a in ("-h", "--help", "--print_config") for a in argv):
        return argv
    cfg, notes = plan_dataset(Path(root), sam_checkpoint=_value(argv, "--model.network.sam_checkpoint"))
    run = Path(_value(argv, "--trainer.default_root_dir") or cfg["trainer"]["default_root_dir"])
    out = write_plan(cfg, notes, run / "plan.yaml", overwrite=True)
    print(f"sautomed: no --config: planned {root} (sautomed plan) -> {out}")
    return ["fit", "--config", str(out), *argv[1:]]
