"""The bench run: the measures in groups that take turns, the training steps in workers, resumable.

A group of measures is a dict {name: function}; `Measures.timed` times it in turns and records
``<name>_s`` / ``<name>_all_s`` (and encoder calls for counted names). A new backbone needs nothing here
(``--model`` takes every `NetworkConfig.backbone`); a new measure is one more entry in a group.

``--compare`` backbones are measured beside the model with the same settings: the encoder and predict on
one synthetic case in the same group as the model's (in turns), and their training steps in a worker each.
Per backbone the results are in ``r["backbones"][name]``; the model's are also at the top level.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from sautomed.bench import worker
from sautomed.bench.chain import train_measures
from sautomed.bench.report import evaluate_targets, machine_info
from sautomed.bench.settings import (
    BenchSettings,
    autocast,
    autocast_dtype,
    encoder_autocast_dtype,
    for_backbone,
)
from sautomed.bench.timing import count_encoded, loadavg, predicted_ratio, sync, time_interleaved
from sautomed.bench.workload import build_net, encoder_gflop_per_slice, naive_loop, synthetic_volume
from sautomed.errors import UserError
from sautomed.models.sam.refine import PretrainedBoxRefiner, worst_case_logits
from sautomed.models.sautomed.inference import InferenceEngine
from sautomed.models.sautomed.network import SAutoMedNet

# what one backbone's training worker records (`Measures.training`; chain.train_measures)
TRAIN_KEYS = (
    "train_step_s",
    "train_first_step_s",
    "train_peak_mb",
    "train_step_mb",
    "train_memory_method",
    "train_error",
    "train_step_cached_s",
    "train_step_uncached_s",
    "train_feature_cache",
    "train_encoder_frozen",
    "train_supervised_slices_per_window",
    "train_supervised_slices_per_step",
    "train_supervised_slices_per_s",
    "train_chain_before",
    "train_chain_after",
    "train_supervised_slices_per_s_before",
    "train_supervised_slices_per_s_after",
    "train_steps_s",
)


class Measures:
    """The results so far (``r``), the partial results of an interrupted run (``old``) and the reporters."""

    def __init__(
        self,
        s: BenchSettings,
        net: SAutoMedNet,
        r: dict[str, Any],
        old: dict[str, Any],
        progress: Callable[[str], None],
        partial: Callable[[dict[str, Any]], None],
    ) -> None:
        self.s, self.net, self.r, self.old, self.progress, self.partial = s, net, r, old, progress, partial

    def _counting(self, counters: dict[str, list[int]], name: str) -> Callable[[], Any]:
        @contextmanager
        def ctx() -> Iterator[None]:
            with count_encoded(self.net) as calls:
                yield
            counters[name].extend(calls)

        return ctx

    def timed(self, group: dict[str, Callable[[], Any]], count: tuple[str, ...] = ()) -> dict[str, Any]:
        """Time a group of measures in turns; their medians into r[name + "_s"], results returned.

        ``count``: names whose first run's encoder calls go into r too. A measure found in ``old`` is kept
        from there and not run.
        """
        s, r = self.s, self.r
        todo = {}
        for name, fn in group.items():
            keys = [name + "_s", name + "_all_s"]
            keys += [f"encoded_slices_{name}", f"encoder_calls_{name}"] if name in count else []
            if all(self.old.get(k) is not None for k in keys):
                r.update({k: self.old[k] for k in keys})
                r["resumed"].append(name)
            else:
                todo[name] = fn
        if not todo:
            return {}
        self.progress(", ".join(todo) + " (in turns)")
        counters: dict[str, list[int]] = {name: [] for name in todo}
        reps = {
            name: s.naive_repeats if name == "naive_loop" and s.naive_repeats else s.repeats for name in todo
        }
        firsts = {name: self._counting(counters, name) for name in todo if name in count}
        res = time_interleaved(todo, reps, s.warmup, s.device, firsts)
        for name, t in res.items():
            r[name + "_s"], r[name + "_all_s"] = t["median"], t["all"]
            if name in count:
                r[f"encoded_slices_{name}"] = sum(counters[name])
                r[f"encoder_calls_{name}"] = len(counters[name])
        self.partial(r)
        return {name: t["result"] for name, t in res.items()}

    def training(self, checkpointed: bool, backbone: str | None = None) -> None:
        """Training steps in a worker: times and peak memory, or with checkpointing the peak only.

        ``backbone``: a compared backbone (``--compare``): its measures go to ``r["backbones"][backbone]``
        only; the model's go to the top level and to ``r["backbones"][model]``. A step that does not fit
        (the worker is killed, e.g. out of memory) is recorded in ``train_error``
        (``train_error_checkpointed``) and the bench goes on: the other measures stand.
        """
        s, r, old = self.s, self.r, self.old
        if not checkpointed:
            name = backbone or str(s.network.get("backbone"))
            sb = for_backbone(s, backbone) if backbone else s
            prev = old if backbone is None else (old.get("backbones") or {}).get(backbone) or {}
            if prev.get("train_step_s") is not None or prev.get("train_error") is not None:
                rec = {k: prev.get(k) for k in TRAIN_KEYS}
                r["resumed"].append("train" if backbone is None else f"train_{backbone}")
            else:
                self.progress(
                    f"{name} training steps (batch {s.train_batch}, {s.warmup_slices} warm-ups; "
                    f"before/after chains)"
                )
                rec = dict.fromkeys(TRAIN_KEYS)
                try:
                    plain = worker.run_train_worker(sb, checkpointed=False, timing=True)
                    rec.update(
                        train_first_step_s=plain["first_step_s"],
                        train_peak_mb=plain["peak_mb"],
                        train_step_mb=plain["step_mb"],
                        train_memory_method=plain["memory_method"],
                        **train_measures(sb, plain),
                    )
                except RuntimeError as exc:
                    rec["train_error"] = str(exc)
                    self.progress(f"{name} training step failed: {exc}")
            r["backbones"].setdefault(name, {}).update(rec)
            if backbone is None:
                r.update(rec)
            self.partial(r)
            return
        keys = ("train_peak_mb", "train_step_mb", "train_first_step_s")
        if old.get("train_peak_mb_checkpointed") is not None or old.get("train_error_checkpointed"):
            r.update({f"{k}_checkpointed": old.get(f"{k}_checkpointed") for k in keys})
            r["train_error_checkpointed"] = old.get("train_error_checkpointed")
            r["resumed"].append("train_checkpointed")
            return
        self.progress("training step with gradient checkpointing")
        try:
            ckpt = worker.run_train_worker(s, checkpointed=True, timing=False)
            r.update({f"{k}_checkpointed": ckpt[k.removeprefix("train_")] for k in keys})
            r.setdefault("train_memory_method", ckpt["memory_method"])
        except RuntimeError as exc:
            r["train_error_checkpointed"] = str(exc)
            self.progress(f"checkpointed training step failed: {exc}")


def _settings_record(s: BenchSettings, image_size: int) -> dict[str, Any]:
    """The settings a result depends on (a resumed run must match them)."""
    return {
        "backbone": s.network.get("backbone"),
        "image_size": image_size,
        "slices": s.slices,
        "classes": s.network.get("num_classes"),
        "out_size": s.out_size,
        "encode_chunk": s.encode_chunk,
        "train_batch": s.train_batch,
        "train_warmup_slices": s.warmup_slices,
        "train_warmup_min": s.warmup_min,
        "train_warmup_loss": float(s.loss.get("warmup", 0.0)),
        "train_feature_cache": s.feature_cache,
        "before_warmups": list(s.before_warmups),
        "compare": list(s.compare),
        "case_slices": s.case_slices,
        "mode": s.mode,
        "repeats": s.repeats,
        "naive_repeats": s.naive_repeats or s.repeats,
        "warmup": s.warmup,
        "compile": s.compile,
        "naive_loop": "per slice: encode [t-1, t, t+1] (clamped) in one call, a batch-1 step, resize, argmax",
        "device": s.device,
        "dtype": s.dtype,
        "threads": torch.get_num_threads(),
    }


def _step_group(net: SAutoMedNet, feats: Tensor, s: BenchSettings) -> dict[str, Callable[[], Any]]:
    """One decoder step for one chain and for two chains: what batching the two chains costs."""
    group: dict[str, Callable[[], Any]] = {}
    for batch in (1, 2):
        f = feats[:batch].expand(batch, -1, -1, -1) if feats.shape[0] < batch else feats[:batch]
        state = net.initial_state(batch, feats.device)

        def one_step(f: Tensor = f, state: Any = state) -> Any:
            with torch.no_grad(), autocast(s.device, s.dtype):
                return net.step(f, f, f, state)

        group[f"step_batch{batch}"] = one_step
    return group


def run_bench(
    s: BenchSettings,
    progress: Callable[[str], None] = lambda m: None,
    partial: Callable[[dict[str, Any]], None] = lambda r: None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure everything (see the package docstring); returns the result dict written as JSON.

    ``partial`` receives the results so far after every measure (a long run that dies leaves them behind);
    ``resume``: such partial results of the same settings: their measures are kept, not run again (listed
    under ``resumed``). ``s.threads`` holds for the run only: the caller's torch thread count is restored.
    """
    before = torch.get_num_threads()
    try:
        if s.threads:
            torch.set_num_threads(s.threads)
        return _run_bench(s, progress, partial, resume)
    finally:
        torch.set_num_threads(before)


def _run_bench(
    s: BenchSettings,
    progress: Callable[[str], None],
    partial: Callable[[dict[str, Any]], None],
    resume: dict[str, Any] | None,
) -> dict[str, Any]:
    dev, n = s.device, s.slices
    net = build_net(s).eval().to(dev)
    size = net.cfg.image_size
    volume = synthetic_volume(n, size, s.seed, dev)  # (N, S, S)
    out_hw = (s.out_size, s.out_size)
    ad, enc = autocast_dtype(s.dtype), encoder_autocast_dtype(s.dtype)
    engines = {m: InferenceEngine(net, m, s.encode_chunk, ad, enc) for m in ("mid_to_ends", "end_to_end")}
    settings = _settings_record(s, size)
    model = str(s.network.get("backbone", "tiny"))
    r: dict[str, Any] = {
        "settings": settings,
        "load_average_start": loadavg(),
        "resumed": [],
        "backbones": {b: {} for b in (model, *s.compare)},
    }
    if resume is not None and resume.get("settings") != settings:
        raise UserError("--resume: the partial results were measured with other settings")
    m = Measures(s, net, r, resume or {}, progress, partial)

    gflop_slice = encoder_gflop_per_slice(net, size, dev, s.dtype)
    compile_s = None
    if s.compile:
        net.encode = torch.compile(net.encode)  # type: ignore[method-assign]
        progress("compiling the encoder")
        t0 = time.perf_counter()
        engines["mid_to_ends"].encode_volume(volume)
        sync(dev)
        compile_s = time.perf_counter() - t0

    # whole volumes: the encoder alone, both modes, the naive loop, in turns
    group = {
        "encoder_only": lambda: engines["mid_to_ends"].encode_volume(volume),
        "volume_mid_to_ends": lambda: engines["mid_to_ends"].segment(volume, out_hw),
        "volume_end_to_end": lambda: engines["end_to_end"].segment(volume, out_hw),
    }
    if s.naive:
        group["naive_loop"] = lambda: naive_loop(net, volume, out_hw, s.dtype)
    m.timed(group, count=("volume_mid_to_ends", "volume_end_to_end", "naive_loop"))
    r["encoded_slices_engine"] = r["encoded_slices_volume_mid_to_ends"]
    r["encoded_slices_naive"] = r.get("encoded_slices_naive_loop")
    r.setdefault("naive_loop_s", None)

    # after the encoder: propagation in both modes, and one decoder step at batch 1 and 2, in turns
    feats = engines["mid_to_ends"].encode_volume(volume)  # (N, D, h, w)
    group = {f"propagation_{mode}": (lambda e=eng: e.propagate(feats)) for mode, eng in engines.items()}
    m.timed({**group, **_step_group(net, feats, s)})
    r["encoder_gflop_per_slice"] = gflop_slice
    r["encoder_gflop"] = gflop_slice * n
    r["encoder_gflops_per_s"] = r["encoder_gflop"] / r["encoder_only_s"]
    r["compile_s"] = compile_s

    # the model beside the compared backbones: the encoder and predict on one case, in turns
    nets = {model: net, **{b: build_net(for_backbone(s, b)).eval().to(dev) for b in s.compare}}
    case = synthetic_volume(s.case_slices, size, s.seed, dev)  # (case_slices, S, S)
    case_engines = {b: InferenceEngine(x, s.mode, s.encode_chunk, ad, enc) for b, x in nets.items()}
    group = {}
    for b, eng in case_engines.items():
        group[f"case_encoder_{b}"] = lambda e=eng: e.encode_volume(case)
        group[f"predict_case_{b}"] = lambda e=eng: e.segment(case, out_hw)
    m.timed(group)
    for b in nets:
        r["backbones"][b].update(
            encoder_s_per_slice=r[f"case_encoder_{b}_s"] / s.case_slices,
            predict_case_s=r[f"predict_case_{b}_s"],
        )
    r["encoder_s_per_slice"] = r["backbones"][model]["encoder_s_per_slice"]
    r["predict_case_s"] = r["backbones"][model]["predict_case_s"]
    del nets, case_engines
    r["refine_case_s"] = None  # inference.sam_refine: LiteMedSAM's second pass, its worst case (refine.py)
    if s.sam_refine and model == "litemedsam":
        refiner = PretrainedBoxRefiner(None, size, s.sam_refine_margin)
        C = net.cfg.num_classes
        worst = worst_case_logits(s.case_slices, C, size).to(dev)
        m.timed({"refine_case": lambda: refiner.scores(case, worst, C)})
        r["backbones"][model]["refine_case_s"] = r["refine_case_s"]

    r.update(dict.fromkeys(("train_step_s", "train_peak_mb", "train_step_mb", "train_peak_mb_checkpointed")))
    if s.train:
        m.training(checkpointed=False)
        m.training(checkpointed=True)
        for b in s.compare:
            m.training(checkpointed=False, backbone=b)

    r["targets"] = evaluate_targets(r)
    r["load_average_end"] = loadavg()
    r["mid_to_ends_predicted_ratio"] = predicted_ratio(n, r["step_batch1_s"], r["step_batch2_s"])
    r["machine"] = machine_info(dev)
    r["device"] = dev
    r["dtype"] = s.dtype
    r["threads"] = torch.get_num_threads()
    r["torch"] = torch.__version__
    return r
