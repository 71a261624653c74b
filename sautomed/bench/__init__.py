"""`sautomed bench`: speed and memory of 3D-SAutoMed volume inference and of one training step.

    sautomed bench --config configs/btcv.yaml --model vit_b --image-size 512 --slices 16 --classes 8 \\
        --json bench.json
    sautomed bench --config configs/chaos_mr_litemedsam.yaml --compare tiny --json bench.json
    sautomed bench --ckpt sam/last.ckpt unet2d/last.ckpt unet3d/last.ckpt --image case.nii.gz

``--ckpt``: trained checkpoints of every family timed on one case as ``predict`` runs them, in one run, with
their ensemble (``trained.py``). Otherwise:
Random weights (no SAM checkpoint), a synthetic volume, everything measured in one run: medians over
``--repeats`` after ``--warmup`` runs that are not counted. Measures that are compared run in turns (round k
runs each of them once), so that other work starting or stopping on the machine touches them alike. The JSON
is rewritten after every group of measures; ``--resume`` continues an interrupted run of the same settings.
What each number is:

- ``encoder_only_s``: ``InferenceEngine.encode_volume`` (SAM encoder, every slice once, in chunks): the floor;
- ``propagation_<mode>_s``: ``InferenceEngine.propagate`` on precomputed encoder features: everything after
  the SAM encoder (slice attention, box prompts, decoder, history, the next anchors), in each mode;
- ``volume_<mode>_s``: ``InferenceEngine.segment``: encoding, propagation, resize to the original plane and
  argmax, in each mode;
- ``naive_loop_s``: the per-slice baseline: for each slice t from first to last, one encoder call on slices
  t-1, t, t+1 (clamped at the volume edges), one decoder step (batch 1) from the previous slice's state, then
  resize and argmax of that slice: 3N slice encodings instead of N;
- ``step_batch1_s``, ``step_batch2_s``: one decoder step (``net.step``) for one chain and for two chains;
  mid_to_ends runs 1 + ceil((N - 1) / 2) steps, most of them at batch 2, end_to_end N steps at batch 1;
- ``encoder_gflop`` (all N slices; counted with ``torch.utils.flop_counter``) and ``encoder_gflops_per_s``;
- ``train_step_s``, ``train_peak_mb``, ``train_peak_mb_checkpointed``: one training step
  (``SAutoMedModule.training_step`` on a synthetic window batch with n = warmup_max warm-ups, backward, AdamW
  step), each in a fresh subprocess. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the
  process's peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the
  step, else ``ru_maxrss``). ``train_step_mb`` is the growth of that peak over the memory held before the
  step. ``train_step_s`` is the step as the config runs it: with a frozen encoder and
  ``data.windows.augmented_copies > 0`` the features come from the module's cache (filled before the timing),
  so the step costs only the decoder chain; ``train_step_cached_s`` / ``train_step_uncached_s``: the step with
  cached features (frozen encoders only) and with the encoder run on the window, timed in turns;
- ``train_supervised_slices_per_s``: slices carrying a loss per second (batch x (n + 1) per step with
  ``loss.warmup > 0``, batch x 1 without), for the config's step; ``..._before`` / ``..._after``: over a
  training run's warm-up counts (n uniform in the range): ``before`` warm-ups 1..3 (``--before-warmups``), no
  warm-up loss, encoder every step; ``after`` the config's chain (``warmup_min..n``, its warm-up loss, its
  cache); details in ``train_chain_before`` / ``train_chain_after`` (`chain.py`);
- ``encoder_s_per_slice``, ``predict_case_s``: the encoder per slice and ``InferenceEngine.segment`` (the
  config's mode, as ``SAutoMedModule.engine(...).segment`` in ``predict``) on one synthetic
  ``--case-slices`` (35) slice case;
- ``--compare tiny``: the backbones named are measured beside ``--model`` with the same config in the same
  run (the case measures in the model's group, in turns; training in a worker each): ``backbones[name]``
  holds each one's ``BACKBONE_KEYS`` (the model's too), and the report prints them side by side.

The package: ``settings`` (flags and config), ``workload`` (network, synthetic volume, naive loop, FLOPs),
``timing`` (the harness), ``memory`` (peak memory), ``chain`` (supervised slices, the steps a training chain
needs), ``worker`` (the training steps in a fresh process), ``run``
(the measures in groups), ``report`` (keys, targets, the table); ``bench_main`` is the command.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from sautomed.bench.chain import supervised_slices
from sautomed.bench.report import (
    BACKBONE_KEYS,
    RESULT_KEYS,
    TARGETS,
    evaluate_targets,
    format_report,
    machine_info,
)
from sautomed.bench.run import run_bench
from sautomed.bench.settings import BACKBONES, BenchSettings, build_parser, settings_from_args
from sautomed.bench.timing import count_encoded, time_interleaved, time_it
from sautomed.bench.workload import build_net, encoder_gflop_per_slice, naive_loop, synthetic_volume
from sautomed.data.io import atomic_write

__all__ = [
    "BACKBONES",
    "BACKBONE_KEYS",
    "RESULT_KEYS",
    "TARGETS",
    "BenchSettings",
    "bench_main",
    "build_net",
    "build_parser",
    "count_encoded",
    "encoder_gflop_per_slice",
    "evaluate_targets",
    "format_report",
    "machine_info",
    "naive_loop",
    "run_bench",
    "settings_from_args",
    "supervised_slices",
    "synthetic_volume",
    "time_interleaved",
    "time_it",
]


def bench_main(argv: Sequence[str]) -> int:
    """`sautomed bench ...`: prints the table and PASS/FAIL lines; exit 0 whatever the targets say."""
    a = build_parser().parse_args(list(argv))
    if a.ckpt:
        return _bench_trained(a)
    s = settings_from_args(a)

    def write(r: dict[str, Any], complete: bool) -> None:
        if a.json is not None:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({**r, "complete": complete}, indent=2) + "\n"
            atomic_write(a.json, lambda tmp: tmp.write_text(text))

    def progress(message: str) -> None:
        print(f"[bench] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    previous = None
    if a.resume:
        if a.json is None or not a.json.is_file():
            raise FileNotFoundError("--resume needs the --json file of the interrupted run")
        previous = json.loads(a.json.read_text())
    result = run_bench(s, progress=progress, partial=lambda r: write(r, False), resume=previous)
    print(format_report(result))
    write(result, True)
    if a.json is not None:
        print(f"wrote {a.json}")
    return 0


def _bench_trained(a: Any) -> int:
    """`sautomed bench --ckpt A B ...`: trained checkpoints of any family on one case (bench/trained.py)."""
    from sautomed.bench.trained import bench_trained, format_trained, trained_settings

    s = trained_settings(a)
    result = bench_trained(
        s, progress=lambda m: print(f"[bench] {time.strftime('%H:%M:%S')} {m}", file=sys.stderr, flush=True)
    )
    print(format_trained(result))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(a.json, lambda tmp: tmp.write_text(text))
        print(f"wrote {a.json}")
    return 0
