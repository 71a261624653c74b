"""`sautomed predict`: segment volumes with a checkpoint alone (its config travels inside).

Runs through Lightning's `Trainer.predict`, so `--devices N --strategy ddp` shards the inputs across ranks
(every input on exactly one rank). Broken inputs are reported and skipped; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sautomed.errors import UserError
from sautomed.tools import predict_outputs

# 3D-SAutoMed's propagation orders (models/sautomed/inference.py MODES; a test keeps the two equal), here so
# that `sautomed predict --help` answers without importing torch
MODES = ("mid_to_ends", "end_to_end")

log = logging.getLogger("sautomed.predict")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sautomed predict", description=__doc__.splitlines()[0])
    p.add_argument(
        "--ckpt_path",
        "--ckpt-path",
        dest="ckpt_path",
        type=Path,
        nargs="+",
        help="checkpoint; several: an ensemble averaging their class probabilities (same classes and input)",
    )
    p.add_argument(
        "--model", default=None, help="a model that ships with sautomed (sautomed models lists them)"
    )
    p.add_argument(
        "-i",
        "--input",
        required=True,
        type=Path,
        nargs="+",
        help="volume files, DICOM series folders or folders of them",
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    p.add_argument(
        "--mode", choices=MODES, default=None, help="propagation order (default: the checkpoint's)"
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="accelerator (auto: a GPU if there is one)",
    )
    p.add_argument("--devices", default="1", help="number of devices (DDP shards the inputs)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument(
        "--encoder-bf16",
        action="store_true",
        help="3D-SAutoMed: bfloat16 autocast for the image encoder only (faster on CPUs with AMX: README)",
    )
    p.add_argument(
        "--largest-component",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the model's own largest-component step for every class (inference.largest_component; "
        "default: the checkpoint's)",
    )
    p.add_argument(
        "--keep-largest",
        nargs="+",
        metavar="CLASS",
        default=None,
        help="after everything else (an ensemble's mean included), keep only the largest 3D component of "
        "these classes (names, label values or all; `sautomed crossval` says which help on its folds)",
    )
    p.add_argument(
        "--sam-refine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LiteMedSAM as published redraws each organ's box (3D-SAutoMed of the litemedsam backbone, or a "
        "U-Net checkpoint; default: the checkpoint's inference.sam_refine)",
    )
    p.add_argument(
        "--source",
        choices=("chain", "dense"),
        default=None,
        help="3D-SAutoMed: the slice chain's masks, or the dense proposals alone (a checkpoint trained with "
        "network.dense_head; default: the checkpoint's inference.source)",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: in-plane zooms, and left-right flips where no class is sided (slower)",
    )
    p.add_argument(
        "--clicks",
        type=Path,
        default=None,
        help="M-SAM: a JSON file of each case's positive / negative clicks (mm or voxel indices), applied in "
        "order from the automatic mask (sautomed/models/msam/session.py documents the format)",
    )
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write each case's class probabilities as CASE.npz beside its labels (float16, the label "
        "map's array order; `sautomed ensemble` averages them)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict_outputs.add_output_arguments(p)  # --statistics, --preview, --dicom-seg
    return p


def check_output_folder(folder: Path) -> None:
    """Create the output folder and prove a file can be made in it, before any work: a UserError if not.

    Permission bits alone do not tell (root ignores them; a read-only file system does not show in them),
    so this creates and removes a probe file.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".sautomed-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{folder}: the output folder is not writable ({exc.strerror or exc})") from exc


def inference_changes(a: argparse.Namespace) -> dict[str, Any]:
    """The inference settings predict's flags change (a flag not given leaves the checkpoint's)."""
    changes: dict[str, Any] = {}
    if a.mode:
        changes["mode"] = a.mode
    if a.bf16:
        changes["bf16"] = True
    if a.encoder_bf16:
        changes["encoder_bf16"] = True
    for name in ("largest_component", "sam_refine"):
        if getattr(a, name) is not None:
            changes[name] = getattr(a, name)
    if a.source:
        changes["source"] = a.source
    return changes


def predict_main(argv: Sequence[str]) -> int:
    a = build_parser().parse_args(argv)
    if (a.ckpt_path is None) == (a.model is None):
        raise UserError("predict needs --ckpt_path CKPT [CKPT ...] or --model NAME (one of the two)")
    if a.model is not None:
        from sautomed.zoo import model_path

        a.ckpt_path = [model_path(a.model)]
    import lightning as L  # the heavy imports after the arguments: --help and usage errors stay fast
    from torch.utils.data import DataLoader

    from sautomed.data.datasets import PredictDataset, collate_single
    from sautomed.data.io import stale_temporaries
    from sautomed.data.preprocess import Preprocessing
    from sautomed.data.samplers import ShardSampler
    from sautomed.evaluation.ensemble import Ensemble
    from sautomed.families import module_from_checkpoint, with_inference_changes
    from sautomed.run_folder import read_checkpoint
    from sautomed.writers import VolumeWriter, plan_predictions

    clicks = None
    if a.clicks is not None:
        from sautomed.models.msam.session import read_clicks_file

        clicks = read_clicks_file(a.clicks)  # a malformed file fails before the model loads
    extras = predict_outputs.Extras.from_args(a)  # a missing optional dependency fails here, before the work
    changes = inference_changes(a)
    members, families = [], []
    for path in a.ckpt_path:
        ckpt = read_checkpoint(path)
        member = module_from_checkpoint(ckpt)
        member.inference = with_inference_changes(member, changes)
        if member.preprocessing is None:
            raise UserError(f"{path}: the checkpoint carries no preprocessing settings")
        members.append(member)
        families.append(ckpt["sautomed"].get("family"))
    if len(members) == 1:
        module, family = members[0], families[0]
    else:
        module, family = Ensemble(members, [str(p) for p in a.ckpt_path]), "ensemble:" + ",".join(families)
    if clicks is not None:
        if not hasattr(module, "user_clicks"):
            raise UserError(
                f"--clicks {a.clicks}: only M-SAM checkpoints take clicks, not {type(module).__name__}"
            )
        module.user_clicks = clicks
    if a.save_probabilities:
        if clicks is not None:
            raise UserError("--save-probabilities: not with --clicks (a click session gives labels only)")
        module.save_probabilities = True
    if a.keep_largest:
        from sautomed.evaluation.postprocess import resolve_classes

        try:
            module.keep_largest = resolve_classes(a.keep_largest, module.class_names, "--keep-largest")
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    if a.tta:
        if not module.supports_tta:
            raise UserError(f"--tta: not available for this checkpoint's model ({type(module).__name__})")
        module.tta = True
    preprocessing = Preprocessing(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in module.preprocessing.items()}
    )

    channels = int(getattr(module, "input_channels", 1))  # M-SAM may read several (nnU-Net _0000, _0001)
    plan = plan_predictions(a.input, a.output, a.overwrite, channels)
    for path, reason in plan.ignored:
        print(f"note: ignored {path}: {reason}", file=sys.stderr)
    for path in plan.kept:
        print(f"note: kept existing {path} (use --overwrite to replace it)", file=sys.stderr)
    for dst in [dst for _, dst in plan.jobs] + plan.kept:
        for tmp in stale_temporaries(dst):  # left by a run killed while writing
            try:
                tmp.unlink(missing_ok=True)
                print(f"note: removed {tmp}, a partial file of an interrupted run", file=sys.stderr)
            except OSError:
                pass
    if clicks is not None:
        unmatched = clicks.unmatched([dst.name for _, dst in plan.jobs] + [k.name for k in plan.kept])
        if unmatched:
            names = ", ".join(sorted(dst.name for _, dst in plan.jobs)) or "none"
            raise UserError(
                f"--clicks {a.clicks}: no input for case(s) {', '.join(unmatched)} (cases are named as the "
                f"outputs, without extension: {names})"
            )
    if not plan.jobs:
        print("nothing to predict", file=sys.stderr)
        return 0
    check_output_folder(a.output)
    predict_outputs.write_run_label_table(a.output, module.class_names, a.ckpt_path[0], family, a.overwrite)

    writer = VolumeWriter(overwrite=a.overwrite)
    devices = int(a.devices) if str(a.devices).isdigit() else a.devices
    trainer = L.Trainer(
        accelerator=a.device,
        devices=devices,
        strategy=a.strategy,
        callbacks=[writer],
        logger=False,
        enable_progress_bar=not a.no_progress,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=str(a.output),
    )
    loader = DataLoader(
        PredictDataset(plan.jobs, preprocessing, channels),
        batch_size=1,
        sampler=ShardSampler(len(plan.jobs)),
        collate_fn=collate_single,
    )
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    if not trainer.is_global_zero:
        return 0
    done = [(src, dst) for src, dst in plan.jobs if str(dst) in set(writer.written)]
    writer.failed += predict_outputs.write_extras(
        done, a.output, module.class_names, module.preprocessing, extras
    )
    for src, reason in writer.failed:
        print(f"sautomed: failed {src}: {reason}", file=sys.stderr)
    print(f"wrote {len(writer.written)} of {len(plan.jobs)} outputs to {a.output}", file=sys.stderr)
    return 1 if writer.failed else 0
