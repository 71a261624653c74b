"""What one bench run depends on: the config's values overridden by the flags, and the flags themselves.

The backbones are those `NetworkConfig.backbone` accepts, so a backbone added there is measurable at once;
``--compare`` measures more of them beside ``--model`` with the same config (`for_backbone`).
"""

from __future__ import annotations

import argparse
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from sautomed.errors import UserError
from sautomed.models.sautomed.inference import Mode
from sautomed.models.sautomed.network import NetworkConfig

BACKBONES: tuple[str, ...] = typing.get_args(typing.get_type_hints(NetworkConfig)["backbone"])


@dataclass
class BenchSettings:
    """Everything one bench run depends on (the config's values, overridden by the flags)."""

    network: dict[str, Any] = field(default_factory=dict)  # NetworkConfig fields
    slices: int = 16
    out_size: int = 512
    encode_chunk: int = 8
    train_batch: int = 8
    warmup_slices: int = 3  # n: the config's warmup_max
    warmup_min: int = 1  # the config's warmup_min: the training chain's n is drawn from warmup_min..n
    feature_cache: bool = False  # the data gives slice_key (augmented_copies > 0): a frozen encoder caches
    before_warmups: tuple[int, int] = (1, 3)  # the "before" chain: these warm-ups, no warm-up loss, encoded
    loss: dict[str, Any] = field(default_factory=dict)
    compare: tuple[str, ...] = ()  # backbones measured beside the model (same config)
    case_slices: int = 35  # slices of the synthetic case of `predict_case_s`
    mode: Mode = "mid_to_ends"  # the config's model.inference.mode (predict_case_s)
    sam_refine: bool = False  # the config's model.inference.sam_refine (refine_case_s, litemedsam only)
    sam_refine_margin: int = 6
    device: str = "cpu"
    dtype: str = "fp32"
    repeats: int = 3
    warmup: int = 1
    naive_repeats: int | None = None  # None: ``repeats``
    compile: bool = False
    threads: int | None = None
    naive: bool = True
    train: bool = True
    seed: int = 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sautomed bench",
        description="Speed and memory of volume inference and of one training step (random weights).",
    )
    p.add_argument("--config", type=Path, help="a sautomed config: network, batch size, warm-ups (defaults)")
    p.add_argument(
        "--ckpt",
        nargs="+",
        metavar="CKPT",
        help="trained checkpoints of any family, timed on one case as predict runs them, in one run, and "
        "their ensemble (bench/trained.py); instead of the random-network measures",
    )
    p.add_argument(
        "--image",
        type=Path,
        help="with --ckpt: the case to time (a case_0000 file for multi-channel models; default: synthetic)",
    )
    p.add_argument("--no-ensemble", action="store_true", help="with --ckpt: do not time their ensemble")
    p.add_argument("--model", choices=BACKBONES, help="backbone (overrides the config)")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="BACKBONE[,BACKBONE]",
        help=f"backbones measured beside --model, same config, same run ({', '.join(BACKBONES)})",
    )
    p.add_argument("--image-size", type=int, help="input size S (overrides the config)")
    p.add_argument("--slices", type=int, default=16, help="slices N of the synthetic volume")
    p.add_argument("--classes", type=int, help="foreground classes C (overrides the config)")
    p.add_argument("--out-size", type=int, default=512, help="in-plane size the labels are resized to")
    p.add_argument("--case-slices", type=int, default=35, help="slices of the synthetic predict case")
    p.add_argument("--encode-chunk", type=int, help="slices per encoder call (default: the config's, or 8)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "bf16-encoder"),
        default="fp32",
        help="bf16 = bfloat16 autocast; bf16-encoder: the encoder only (inference.encoder_bf16)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measure (median)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted runs before the timed ones")
    p.add_argument(
        "--naive-repeats", type=int, help="timed runs of the (3x slower) naive loop (default: --repeats)"
    )
    p.add_argument("--train-batch", type=int, help="training batch size (default: the config's)")
    p.add_argument("--warmup-slices", type=int, help="training warm-up slices n (default: warmup_max)")
    p.add_argument(
        "--before-warmups",
        default="1,3",
        metavar="MIN,MAX",
        help="warm-ups of the 'before' training chain (no warm-up loss, encoder run every step)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (compile time reported)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive per-slice baseline")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here (also after every measure)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the measures already in --json (an interrupted run, same settings); listed as resumed",
    )
    return p


def _section(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    sec = cfg.get(key) or {}
    return dict(sec.get("init_args", sec)) if isinstance(sec, dict) else {}


def check_measurable(cfg: dict[str, Any], path: Any) -> None:
    """A UserError for a config of a family the bench does not measure (it builds 3D-SAutoMed networks):
    timing a tiny 3D-SAutoMed for an M-SAM or U-Net config would report figures of another model."""
    model = cfg.get("model")
    class_path = model.get("class_path") if isinstance(model, dict) else None
    if class_path is None:
        return
    from sautomed.families import family_for_class_path

    family = family_for_class_path(class_path)
    if family.name != "sautomed":
        raise UserError(
            f"{path}: a {family.name} config; sautomed bench measures 3D-SAutoMed configs only (time a "
            f"{family.name} model with `sautomed test`: summary.json's predict_seconds_per_case)"
        )


def settings_from_args(a: argparse.Namespace) -> BenchSettings:
    """Config YAML defaults (network, batch size, warm-ups, classes, S, chunk), overridden by the flags."""
    import yaml

    cfg: dict[str, Any] = {}
    if a.config is not None:
        if not Path(a.config).is_file():
            raise FileNotFoundError(f"{a.config}: config not found")
        cfg = yaml.safe_load(Path(a.config).read_text()) or {}
    check_measurable(cfg, a.config)
    model, data = _section(cfg, "model"), _section(cfg, "data")
    known = {f.name for f in fields(NetworkConfig)}
    network = {k: v for k, v in (model.get("network") or {}).items() if k in known}
    network.pop("sam_checkpoint", None)
    if a.model is not None:
        network["backbone"] = a.model
    if a.image_size is not None:
        network["image_size"] = a.image_size
    if a.classes is not None:
        network["num_classes"] = a.classes
    windows = data.get("windows") or {}
    compare = tuple(b.strip() for arg in a.compare for b in arg.split(",") if b.strip())
    unknown = [b for b in compare if b not in BACKBONES]
    if unknown:
        raise UserError(f"--compare: unknown backbone {', '.join(unknown)} (one of {', '.join(BACKBONES)})")
    before = tuple(int(v) for v in str(a.before_warmups).split(","))
    if len(before) != 2 or not 1 <= before[0] <= before[1]:
        raise UserError(f"--before-warmups must be MIN,MAX with 1 <= MIN <= MAX, got {a.before_warmups}")
    s = BenchSettings(
        network=network,
        slices=a.slices,
        out_size=a.out_size,
        encode_chunk=a.encode_chunk or int((model.get("inference") or {}).get("encode_chunk", 8)),
        train_batch=a.train_batch if a.train_batch is not None else int(data.get("batch_size", 8)),
        warmup_slices=a.warmup_slices if a.warmup_slices is not None else int(windows.get("warmup_max", 3)),
        warmup_min=int(windows.get("warmup_min", 1)),
        feature_cache=int(windows.get("augmented_copies", 0)) > 0,
        before_warmups=(before[0], before[1]),
        loss=dict(model.get("loss") or {}),
        compare=tuple(dict.fromkeys(b for b in compare if b != network.get("backbone", "tiny"))),
        case_slices=a.case_slices,
        mode=(model.get("inference") or {}).get("mode", "mid_to_ends"),
        sam_refine=bool((model.get("inference") or {}).get("sam_refine", False)),
        sam_refine_margin=int((model.get("inference") or {}).get("sam_refine_margin", 6)),
        device=a.device,
        dtype=a.dtype,
        repeats=a.repeats,
        warmup=a.warmup,
        naive_repeats=a.naive_repeats,
        compile=a.compile,
        threads=a.threads,
        naive=not a.no_naive,
        train=not a.no_train,
        seed=a.seed,
    )
    NetworkConfig(**s.network)  # unknown backbone / bad types fail here, before anything runs
    if s.slices < 1 or s.repeats < 1 or s.warmup < 0 or s.train_batch < 1 or s.warmup_slices < 0:
        raise UserError("--slices, --repeats and --train-batch must be >= 1; --warmup, --warmup-slices >= 0")
    if s.case_slices < 1:
        raise UserError("--case-slices must be >= 1")
    if s.mode not in typing.get_args(Mode):
        raise UserError(f"model.inference.mode must be one of {typing.get_args(Mode)}, got {s.mode!r}")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available")
    return s


def for_backbone(s: BenchSettings, backbone: str) -> BenchSettings:
    """The same settings with another backbone (and nothing to compare)."""
    return replace(s, network={**s.network, "backbone": backbone}, compare=())


def settings_from_json(d: dict[str, Any]) -> BenchSettings:
    """`BenchSettings` from its ``asdict`` JSON (tuples come back as lists)."""
    before = tuple(d.get("before_warmups", (1, 3)))
    return BenchSettings(**{**d, "compare": tuple(d.get("compare", ())), "before_warmups": before})


def autocast_dtype(dtype: str) -> torch.dtype | None:
    """The autocast dtype of the `--dtype` setting (None: fp32, no autocast)."""
    return torch.bfloat16 if dtype == "bf16" else None


def encoder_autocast_dtype(dtype: str) -> torch.dtype | None:
    """The encoder's autocast dtype at inference (``bf16-encoder``: bf16 for the encoder alone)."""
    return torch.bfloat16 if dtype in ("bf16", "bf16-encoder") else None


def autocast(device: str, dtype: str) -> Any:
    """A context running under the `--dtype` setting's autocast (a no-op for fp32)."""
    ad = autocast_dtype(dtype)
    return torch.autocast(device, dtype=ad) if ad is not None else nullcontext()
