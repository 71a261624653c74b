"""`sautomed crossval`: k-fold cross-validation of configs and of their ensembles, and the winner named
(nnU-Net's ``find_best_configuration``).

    sautomed crossval --config configs/unet2d_chaos_mr_small.yaml configs/unet3d_chaos_mr_small.yaml \\
        --folds 4 --out runs/cv_chaos_mr -- --data.root ../shared/data/chaos-mr

For each config and fold it runs ``sautomed fit`` (its own process) into ``OUT/<config>/fold_<k>`` with
the fold's cases held out (``data.folds``, ``data.fold``, ``data.split_seed``; the arguments after ``--``
go to every fit), without validation during the fit: ``last.ckpt`` is the fold's model, so no checkpoint
is chosen on the cases it is scored on. It then predicts each fold's held-out cases with that fold's
model, saving the class probabilities (``OUT/<config>/oof``), scores every config's out-of-fold
predictions and every ensemble of configs (their probabilities averaged, ``OUT/ensembles/<a+b>``) with one
scorer, and writes ``OUT/crossval.json`` and ``OUT/crossval.md``: the table, the winner (highest mean DSC;
a tie goes to fewer members) and the ``sautomed predict`` command that runs it (every fold's model of each
member, averaged).

Post-processing is chosen on the same out-of-fold predictions, as nnU-Net does: each configuration's label
maps are scored again with the largest 3D component of every class kept alone
(``OUT/postprocessing/<name>/all``), and the step is kept for the classes whose mean DSC rises (or stays
and whose HD95 falls); those classes' post-processed maps (``OUT/postprocessing/<name>/chosen``) give the
row's figures, which rank the configurations, and the winner's command carries ``--keep-largest`` with
them. The figures before the step stay in the record (``before_postprocessing``).

Run again, it keeps what is done: a finished fold (``last.ckpt`` and its ``crossval.done``) is not refitted,
an interrupted one resumes from its ``last.ckpt``, and existing predictions are kept. A fold that fails is
named; the config it belongs to is left out of the table, the others go on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sautomed.data.io import atomic_write
from sautomed.errors import UserError
from sautomed.tools.labels import LABELS_FILE, write_label_table

DONE = "crossval.done"
RESULTS = "crossval.json"
TABLE = "crossval.md"
MAX_ENSEMBLE_CONFIGS = 4  # every combination up to 4 configs (11 ensembles); pairs only beyond


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sautomed crossval",
        description="k-fold cross-validation of configs and their ensembles; names the winner (nnU-Net's "
        "find_best_configuration).",
        epilog="Arguments after `--` are passed to every `sautomed fit` (e.g. -- --data.root DATA).",
    )
    p.add_argument("--config", required=True, nargs="+", type=Path, help="configs to cross-validate")
    p.add_argument("--out", required=True, type=Path, help="output folder (fits, predictions, results)")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the case shuffle before the folds")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="predict's accelerator")
    p.add_argument("--no-ensembles", action="store_true", help="score the configs alone, not their ensembles")
    return p


@dataclass
class Member:
    name: str
    config: Path
    runs: list[Path] = field(default_factory=list)  # one run folder per fold
    failed: list[str] = field(default_factory=list)

    @property
    def oof(self) -> Path:
        return self.runs[0].parent / "oof"


def _names(configs: Sequence[Path]) -> list[str]:
    names = [c.name.removesuffix(".yaml").removesuffix(".yml") for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--config: two configs are named {dup[0]}; copy one under another name")
    return names


def _fit(member: Member, fold: int, folds: int, seed: int, extra: Sequence[str]) -> str | None:
    """Fit one fold in its own process; None when done, else why it failed."""
    run = member.runs[fold]
    if (run / DONE).is_file() and (run / "last.ckpt").is_file():
        print(f"crossval: {member.name} fold {fold}: done before, kept ({run})", file=sys.stderr)
        return None
    cmd = [
        sys.executable,
        "-m",
        "sautomed",
        "fit",
        "--config",
        str(member.config),
        "--data.folds",
        str(folds),
        "--data.fold",
        str(fold),
        "--data.split_seed",
        str(seed),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.default_root_dir",
        str(run),
        *extra,
    ]
    if (run / "last.ckpt").is_file():
        cmd += ["--ckpt_path", str(run / "last.ckpt")]  # an interrupted fit goes on
    print(f"crossval: {member.name} fold {fold}: {' '.join(cmd[2:])}", file=sys.stderr)
    start = time.monotonic()
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0 or not (run / "last.ckpt").is_file():
        return f"sautomed fit exited with {done.returncode} ({run})"
    atomic_write(run / DONE, lambda tmp: tmp.write_text(f"{time.monotonic() - start:.0f} s\n"))
    return None


def _run_config(run: Path) -> dict[str, Any]:
    path = run / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path}: the fit wrote no config.yaml")
    cfg = yaml.safe_load(path.read_text()) or {}
    data = cfg.get("data") or {}
    return data.get("init_args", data)


def _held_out(run: Path, fold: int) -> list[str]:
    path = run / "splits.json"
    try:
        splits = json.loads(path.read_text())
        return list(splits[fold]["val"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UserError(f"{path}: cannot read fold {fold}'s held-out cases ({exc})") from exc


def _predict_held_out(
    member: Member, fold: int, cases: dict[str, Any], ids: Sequence[str], device: str
) -> None:
    """Predict the fold's held-out cases into ``fold_k/held_out`` (with that fold's label table), then copy
    them into the config's ``oof`` folder, which gathers every fold's."""
    from sautomed.predict import predict_main

    run = member.runs[fold]
    held = run / "held_out"
    images = [str(cases[i].image) for i in ids]
    argv = ["--ckpt_path", str(run / "last.ckpt"), "-i", *images, "-o", str(held)]
    argv += ["--save-probabilities", "--device", device, "--no-progress"]
    if predict_main(argv) != 0:
        raise UserError(f"{member.name} fold {fold}: predicting the held-out cases failed")
    member.oof.mkdir(parents=True, exist_ok=True)
    for f in sorted(held.iterdir()):
        target = member.oof / f.name
        if f.name.startswith(".") or f.name == LABELS_FILE or target.exists():
            continue
        atomic_write(target, lambda tmp, f=f: shutil.copyfile(f, tmp))
    table = json.loads((held / LABELS_FILE).read_text())
    table.update(checkpoint=None, family=f"crossval of {member.config}")
    write_label_table(member.oof, table, overwrite=True)


def _score(pred_dir: Path, data: dict[str, Any], ids: Sequence[str]) -> dict[str, Any]:
    from sautomed.evaluation.metrics import summarize
    from sautomed.tools.evaluate import evaluate_folder, references

    label_map = Path(data["label_map"]) if data.get("label_map") else None
    class_names, refs = references(Path(data["root"]), data.get("layout", "nnunet"), label_map, None)
    refs = [r for r in refs if r.case_id in set(ids)]
    result = evaluate_folder(pred_dir, class_names, refs, None)
    summary = summarize(result.rows, class_names)
    summary["missing_predictions"] = result.missing
    summary["failed"] = result.failed
    return summary


def keep_largest_folder(src: Path, dst: Path, classes: Sequence[int]) -> Path:
    """Write each label map of ``src`` into ``dst`` with the largest 3D component alone kept of the label
    values ``classes`` (the rest of those classes -> background), on its own grid, atomically."""
    import SimpleITK as sitk

    from sautomed.data.io import is_volume_file
    from sautomed.evaluation.postprocess import keep_largest_component

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name.startswith(".") or not is_volume_file(f):
            continue
        image = sitk.ReadImage(str(f))
        array = sitk.GetArrayFromImage(image)
        labels = keep_largest_component(array, max(classes), classes).astype(array.dtype)
        kept = sitk.GetImageFromArray(labels)
        kept.CopyInformation(image)
        atomic_write(dst / f.name, lambda tmp, kept=kept: sitk.WriteImage(kept, str(tmp), True))
    return dst


def choose_postprocessing(
    name: str, pred_dir: Path, work: Path, score: Callable[[Path], dict[str, Any]]
) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """nnU-Net's post-processing choice on out-of-fold predictions: (the summary with the chosen classes'
    largest component kept, the chosen class names, the summary before). A class is chosen when keeping its
    largest component raises its mean DSC, or keeps it and lowers its mean HD95."""
    before = score(pred_dir)
    names = list(before["per_class"])
    every = score(keep_largest_folder(pred_dir, work / name / "all", range(1, len(names) + 1)))
    chosen = []
    for c in names:
        old, new = before["per_class"][c], every["per_class"][c]
        if new["dsc"] > old["dsc"] + 1e-6 or (
            new["dsc"] >= old["dsc"] - 1e-6 and new["hd95_mm"] < old["hd95_mm"] - 1e-6
        ):
            chosen.append(c)
    if not chosen:
        return before, [], before
    if len(chosen) == len(names):
        return every, chosen, before
    values = [names.index(c) + 1 for c in chosen]
    return score(keep_largest_folder(pred_dir, work / name / "chosen", values)), chosen, before


def _row(
    name: str,
    members: Sequence[str],
    summary: dict[str, Any],
    largest: Sequence[str] = (),
    before: dict[str, Any] | None = None,
) -> dict[str, Any]:
    before = before or summary
    return {
        "name": name,
        "members": list(members),
        "largest_component": list(largest),
        "before_postprocessing": {"mean_dsc": before["mean_dsc"], "mean_hd95_mm": before["mean_hd95_mm"]},
        "mean_dsc": summary["mean_dsc"],
        "mean_hd95_mm": summary["mean_hd95_mm"],
        "missed": summary.get("missed_cases", 0),
        "per_class": {k: {"dsc": v["dsc"], "hd95_mm": v["hd95_mm"]} for k, v in summary["per_class"].items()},
        "cases": summary["num_cases"],
    }


def _table(rows: Sequence[dict[str, Any]], winner: str, header: str) -> str:
    lines = [
        header,
        "",
        "| configuration | mean DSC | mean HD95 (mm) | organs missed | largest component kept of | before "
        "that: DSC / HD95 | cases |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " (winner)" if r["name"] == winner else ""
        pre = r["before_postprocessing"]
        lines.append(
            f"| {r['name']}{mark} | {r['mean_dsc']:.4f} | {r['mean_hd95_mm']:.2f} | {r['missed']} "
            f"| {', '.join(r['largest_component']) or '-'} | {pre['mean_dsc']:.4f} / "
            f"{pre['mean_hd95_mm']:.2f} | {r['cases']} |"
        )
    return "\n".join(lines) + "\n"


def crossval_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    a = build_parser().parse_args(argv)
    if a.folds < 2:
        raise UserError("--folds must be at least 2 (a fold needs held-out cases)")
    for c in a.config:
        if not c.is_file():
            raise UserError(f"{c}: config file does not exist")
    for flag in ("--data.fold", "--data.folds", "--data.split_seed", "--trainer.default_root_dir"):
        if any(x == flag or x.startswith(flag + "=") for x in extra):
            raise UserError(f"{flag}: crossval sets it for every fold; leave it out of the fit arguments")
    out = a.out
    members = [
        Member(n, c, [out / n / f"fold_{k}" for k in range(a.folds)])
        for n, c in zip(_names(a.config), a.config, strict=True)
    ]
    out.mkdir(parents=True, exist_ok=True)
    for fold in range(a.folds):
        for m in members:
            if m.failed:
                continue
            why = _fit(m, fold, a.folds, a.split_seed, extra)
            if why:
                m.failed.append(f"fold {fold}: {why}")
                print(f"sautomed: crossval: {m.name} fold {fold} failed: {why}", file=sys.stderr)
    ok = [m for m in members if not m.failed]
    if not ok:
        raise UserError("crossval: every config failed to fit; nothing to score")

    from sautomed.data.layouts.layout import get_layout

    data = _run_config(ok[0].runs[0])
    lay = get_layout(
        data.get("layout", "nnunet"), data["root"], data.get("label_map"), int(data.get("channels", 1) or 1)
    )
    cases = {c.case_id: c for c in lay.cases()}
    held: list[list[str]] = []
    for fold in range(a.folds):
        ids = _held_out(ok[0].runs[fold], fold)
        for m in ok[1:]:
            theirs = _held_out(m.runs[fold], fold)
            if sorted(theirs) != sorted(ids):
                raise UserError(
                    f"fold {fold}: {m.name} held out {sorted(theirs)}, {ok[0].name} {sorted(ids)}: the "
                    "configs split other datasets or use a splits_file; give them one data.root"
                )
        unknown = [i for i in ids if i not in cases]
        if unknown:
            raise UserError(f"fold {fold}: held-out case(s) {unknown} are not in {data['root']}")
        held.append(ids)
    all_ids = [i for ids in held for i in ids]
    for m in list(ok):
        try:
            for fold in range(a.folds):
                _predict_held_out(m, fold, cases, held[fold], a.device)
        except UserError as exc:
            m.failed.append(str(exc))
            print(f"sautomed: crossval: {exc}", file=sys.stderr)
            ok.remove(m)

    def score(folder: Path) -> dict[str, Any]:
        return _score(folder, data, all_ids)

    def row(name: str, names: Sequence[str], folder: Path) -> dict[str, Any]:
        summary, largest, before = choose_postprocessing(name, folder, out / "postprocessing", score)
        return _row(name, names, summary, largest, before)

    rows = [row(m.name, [m.name], m.oof) for m in ok]
    if not a.no_ensembles and len(ok) > 1:
        from sautomed.evaluation.probabilities import ensemble_folders

        sizes = range(2, len(ok) + 1) if len(ok) <= MAX_ENSEMBLE_CONFIGS else [2]
        for size in sizes:
            for combo in itertools.combinations(ok, size):
                name = "+".join(m.name for m in combo)
                folder = out / "ensembles" / name
                result = ensemble_folders([m.oof for m in combo], folder)
                for case, why in result.failed:
                    print(f"sautomed: crossval: ensemble {name}, {case}: {why}", file=sys.stderr)
                rows.append(row(name, [m.name for m in combo], folder))
    best = max(rows, key=lambda r: (round(r["mean_dsc"], 4), -len(r["members"]), -r["mean_hd95_mm"]))
    ckpts = " ".join(str(run / "last.ckpt") for m in ok if m.name in best["members"] for run in m.runs)
    command = f"sautomed predict --ckpt_path {ckpts} -i IMAGES -o LABELS"
    if best["largest_component"]:
        command += " --keep-largest " + " ".join(shlex.quote(c) for c in best["largest_component"])
    record = {
        "folds": a.folds,
        "split_seed": a.split_seed,
        "fit_arguments": extra,
        "held_out": held,
        "configs": {m.name: str(m.config) for m in members},
        "failed": {m.name: m.failed for m in members if m.failed},
        "results": rows,
        "winner": best["name"],
        "predict": command,
    }
    atomic_write(out / RESULTS, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    header = (
        f"# Cross-validation: {a.folds} folds (split seed {a.split_seed}), out-of-fold predictions of "
        f"{len(all_ids)} cases\n\nWinner: **{best['name']}**. Run it with\n\n    {command}"
    )
    table = _table(sorted(rows, key=lambda r: -r["mean_dsc"]), best["name"], header)
    atomic_write(out / TABLE, lambda tmp: tmp.write_text(table))
    print(table)
    return 1 if any(m.failed for m in members) else 0
