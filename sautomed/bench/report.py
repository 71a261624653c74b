"""The bench's results: the keys every run writes, the targets they are held to, the machine, the table."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from sautomed.bench.timing import mid_to_ends_batches

# keys every full run writes (train_* are None only with --no-train, naive_loop_s only with --no-naive);
# also written: train_step_cached_s (None where the encoder trains: no cache), the per-chain details
# train_chain_before / train_chain_after, and r["backbones"][name] with the per-backbone keys of BACKBONE_KEYS
RESULT_KEYS = (
    "encoder_only_s",
    "encoder_s_per_slice",
    "predict_case_s",
    "volume_mid_to_ends_s",
    "volume_end_to_end_s",
    "naive_loop_s",
    "propagation_mid_to_ends_s",
    "propagation_end_to_end_s",
    "encoder_gflop",
    "encoder_gflops_per_s",
    "train_step_s",
    "train_peak_mb",
    "train_peak_mb_checkpointed",
    "train_step_uncached_s",
    "train_supervised_slices_per_s",
    "train_supervised_slices_per_s_before",
    "train_supervised_slices_per_s_after",
)
# keys of every r["backbones"][name] (the model and each --compare backbone; train_* None with --no-train)
BACKBONE_KEYS = (
    "encoder_s_per_slice",
    "predict_case_s",
    "train_step_s",
    "train_step_uncached_s",
    "train_supervised_slices_per_s",
    "train_supervised_slices_per_s_before",
    "train_supervised_slices_per_s_after",
)
# (name, measured key, reference key, bar, goal, strict): measured <= bar * reference (< when strict)
TARGETS = (
    (
        "volume_mid_to_ends <= 1.15 x encoder_only",
        "volume_mid_to_ends_s",
        "encoder_only_s",
        1.15,
        1.05,
        False,
    ),
    ("volume_mid_to_ends < naive_loop", "volume_mid_to_ends_s", "naive_loop_s", 1.0, None, True),
    (
        "propagation_mid_to_ends <= 0.65 x propagation_end_to_end",
        "propagation_mid_to_ends_s",
        "propagation_end_to_end_s",
        0.65,
        0.55,
        False,
    ),
)


def machine_info(device: str) -> dict[str, Any]:
    """CPU model and count, platform, Python, torch and its threads (and the GPU on CUDA)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def evaluate_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of TARGETS with its ratio and pass (None when a measure is missing)."""
    out = []
    for name, key, ref, bar, goal, strict in TARGETS:
        if r.get(key) is None or r.get(ref) is None:
            out.append({"name": name, "ratio": None, "bar": bar, "goal": goal, "pass": None})
            continue
        ratio = r[key] / r[ref]
        ok = ratio < bar if strict else ratio <= bar
        out.append({"name": name, "ratio": ratio, "bar": bar, "goal": goal, "pass": ok})
    return out


def format_report(r: dict[str, Any]) -> str:
    """The printed table: measures, training step, decoder steps, warnings about the machine, PASS/FAIL."""
    st, m = r["settings"], r["machine"]
    enc = r["encoder_only_s"]
    lines = [
        f"sautomed bench: {st['backbone']} S={st['image_size']} slices={st['slices']} "
        f"classes={st['classes']} device={r['device']} dtype={r['dtype']} threads={r['threads']} "
        f"torch={r['torch']}",
        f"machine: {m['cpu']} ({m['cpu_count']} CPUs)" + (f", {m['gpu']}" if "gpu" in m else ""),
        f"medians over {st['repeats']} repeats after {st['warmup']} warm-up",
        "",
        f"{'measure':32s} {'seconds':>10s} {'x encoder':>10s} {'s/slice':>9s}",
    ]
    for key in (
        "encoder_only_s",
        "volume_mid_to_ends_s",
        "volume_end_to_end_s",
        "naive_loop_s",
        "propagation_mid_to_ends_s",
        "propagation_end_to_end_s",
    ):
        v = r.get(key)
        if v is not None:
            lines.append(f"{key[:-2]:32s} {v:10.3f} {v / enc:10.3f} {v / st['slices']:9.3f}")
    lines.append(
        f"{'encoder':32s} {r['encoder_gflop']:10.1f} GFLOP, {r['encoder_gflops_per_s']:.1f} GFLOP/s; "
        f"slices encoded: engine {r['encoded_slices_engine']}, naive {r['encoded_slices_naive']}"
    )
    cached = ", cached features" if r.get("train_feature_cache") else ""
    what = f"(batch {st['train_batch']}, {st['train_warmup_slices']} warm-ups{cached})"
    for label, sfx, step_key in (
        ("train step", "", "train_step_s"),
        ("train step, checkpointed", "_checkpointed", "train_first_step_s_checkpointed"),
    ):
        if r.get(f"train_peak_mb{sfx}") is not None:
            first = " (first step)" if sfx else ""
            lines.append(
                f"{label:32s} {r[step_key]:10.3f} s{first} {what}; peak {r[f'train_peak_mb{sfx}']:.0f} MB "
                f"[{r.get('train_memory_method')}]"
            )
        if r.get(f"train_error{sfx}"):
            lines.append(f"{label:32s} {what} FAILED: {r[f'train_error{sfx}']}")
    lines += _backbone_table(r)
    floor = f"{len(mid_to_ends_batches(st['slices']))}/{st['slices']}"
    lines.append(
        f"{'decoder step batch 1 / batch 2':32s} {r['step_batch1_s']:10.3f} / {r['step_batch2_s']:.3f} s "
        f"(x{r['step_batch2_s'] / r['step_batch1_s']:.2f}); mid_to_ends/end_to_end from these: "
        f"{r['mid_to_ends_predicted_ratio']:.3f} (floor {floor})"
    )
    load = r.get("load_average_start")
    if load is not None and m["cpu_count"] and load[0] > 0.5:
        lines.append(
            f"load average at start {load[0]:.2f} on {m['cpu_count']} CPUs: other work may skew the timings"
        )
    if r.get("resumed"):
        lines.append(f"resumed from an interrupted run of the same settings: {', '.join(r['resumed'])}")
    if r.get("compile_s") is not None:
        lines.append(f"{'torch.compile first call':32s} {r['compile_s']:10.3f} s")
    lines.append("")
    for t in r["targets"]:
        if t["pass"] is None:
            lines.append(f"SKIP {t['name']}")
            continue
        goal = f" (goal {t['goal']})" if t["goal"] is not None else ""
        lines.append(f"{'PASS' if t['pass'] else 'FAIL'} {t['name']}: ratio {t['ratio']:.3f}{goal}")
    return "\n".join(lines)


def _cell(v: float | None, fmt: str, width: int = 8) -> str:
    """A right-aligned table cell; "-" where the measure is missing."""
    return ("-" if v is None else format(v, fmt)).rjust(width)


def _chain_words(c: dict[str, Any]) -> str:
    lo, hi = c["warmups"]
    loss = f"warm-up loss {c['warmup_loss']:g}" if c["warmup_loss"] > 0 else "no warm-up loss"
    feats = "cached features" if c["feature_cache"] else "encoder every step"
    return f"warm-ups {lo}..{hi}, {loss}, {feats}: {c['supervised_slices_per_window']:.2f} slices/window"


def _backbone_table(r: dict[str, Any]) -> list[str]:
    """Per backbone: encoder, predict on one case, the training step both ways, supervised slices per s."""
    st, bbs = r["settings"], r.get("backbones") or {}
    if not bbs:
        return []
    head = ("backbone", "enc s/slc", "predict s", "step s", "cached", "encoded", "sup/step", "sup/s")
    lines = [
        "",
        f"backbones at S={st['image_size']}: predict = one {st['case_slices']}-slice case ({st['mode']}, to "
        f"{st['out_size']}x{st['out_size']}); step = a training step (batch {st['train_batch']}, "
        f"{st['train_warmup_slices']} warm-ups)",
        "  step: as the config runs it (*: cached features); cached: with cached features; encoded: the",
        "  encoder run on the window; sup: slices with a loss per step, per s; before, after: chains' sup/s",
        f"{head[0]:12s} "
        + " ".join(h.rjust(9) for h in head[1:])
        + f" {'before':>9s} {'after':>9s} {'x':>6s}",
    ]
    for name, b in bbs.items():
        before, after = (
            b.get("train_supervised_slices_per_s_before"),
            b.get("train_supervised_slices_per_s_after"),
        )
        gain = None if before is None or after is None else after / before
        mark = "*" if b.get("train_feature_cache") else " "
        cells = [
            _cell(b.get("encoder_s_per_slice"), ".4f", 9),
            _cell(b.get("predict_case_s"), ".3f", 9),
            _cell(b.get("train_step_s"), ".3f", 8) + mark,
            _cell(b.get("train_step_cached_s"), ".3f", 9),
            _cell(b.get("train_step_uncached_s"), ".3f", 9),
            _cell(b.get("train_supervised_slices_per_step"), ".0f", 9),
            _cell(b.get("train_supervised_slices_per_s"), ".1f", 9),
            _cell(before, ".1f", 9),
            _cell(after, ".1f", 9),
            _cell(gain, ".2f", 6),
        ]
        lines.append(f"{name:12s} " + " ".join(cells))
        if b.get("train_error"):
            lines.append(f"{'':12s} training step FAILED: {b['train_error']}")
        if b.get("refine_case_s") is not None:
            total = b["refine_case_s"] + (b.get("predict_case_s") or 0.0)
            lines.append(
                f"{'':12s} + inference.sam_refine, worst case (every class on every slice): "
                f"{b['refine_case_s']:.3f} s, predict with it {total:.3f} s"
            )
    first = next((b for b in bbs.values() if b.get("train_chain_before")), None)
    if first is not None:
        lines.append("* the config's step uses cached encoder features (frozen encoder, augmented copies)")
        lines.append(f"before: {_chain_words(first['train_chain_before'])}")
        lines.append(f"after:  {_chain_words(first['train_chain_after'])} (the config's chain)")
    return lines
