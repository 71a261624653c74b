"""The bench's results: the keys every run writes, the targets they are held to, the machine, the table."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from sautomed.bench.timing import mid_to_ends_batches

# keys every full run writes (train_* are None only with --no-train, naive_loop_s only with --no-naive)
RESULT_KEYS = (
    "encoder_only_s",
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
    what = f"(batch {st['train_batch']}, {st['train_warmup_slices']} warm-ups)"
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
