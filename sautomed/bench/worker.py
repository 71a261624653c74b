"""Training steps measured in a fresh Python process, so that the first step's peak memory is its own.

``SAutoMedModule.training_step`` on a synthetic window batch with n warm-ups, backward and an AdamW step: the
config's step's peak memory (`memory.py`, its first run), then, in turns, the median time of every step of
`chain.step_kinds`: the config's step, the same step the other way (cached features / encoder run) where the
encoder is frozen, and the steps of the before/after chains. A cached step is timed with its features
already in the module's cache (filled beforehand), as in a run once every slice was seen.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sautomed.bench.chain import StepKind, config_kind, step_kinds
from sautomed.bench.memory import PeakMemory
from sautomed.bench.settings import BenchSettings, autocast, settings_from_json
from sautomed.bench.timing import sync, time_interleaved
from sautomed.bench.workload import synthetic_volume
from sautomed.models.sautomed.network import NetworkConfig
from sautomed.models.sautomed.window import encode_window_cached


def synthetic_batch(s: BenchSettings, warmups: int | None = None, keyed: bool = False) -> dict[str, Tensor]:
    """A training batch of the data module's shapes: image (B, n+3, S, S), label (B, S, S), ...

    ``warmups``: n (default ``s.warmup_slices``); ``keyed``: with ``slice_key`` (B, n+3), as the data gives
    it with augmented copies: distinct slices, keys distinct across n too.
    """
    b, size = s.train_batch, int(s.network.get("image_size", 256))
    n = s.warmup_slices if warmups is None else warmups
    c = int(s.network.get("num_classes", 4))
    g = torch.Generator().manual_seed(s.seed)
    image = torch.stack([synthetic_volume(n + 3, size, seed=s.seed + i) for i in range(b)])  # (B, n+3, S, S)
    index = torch.arange(n + 3).expand(b, -1) + 10  # distinct slices: each encoded once
    field_ = F.interpolate(torch.rand(b, 1, 8, 8, generator=g), size=(size, size), mode="bilinear")[:, 0]
    label = (field_ * (c + 1)).long().clamp(0, c)  # (B, S, S) blobs of every class
    direction = torch.tensor([1 if i % 2 == 0 else -1 for i in range(b)])
    dev = s.device
    warmup_label = label[:, None].expand(-1, n, -1, -1).contiguous()  # (B, n, S, S) for the warm-up loss
    batch = {
        "image": image.to(dev),
        "index": index.to(dev),
        "label": label.to(dev),
        "warmup_label": warmup_label.to(dev),
        "direction": direction,
    }
    if keyed:
        batch["slice_key"] = (n * 1_000_000 + torch.arange(b * (n + 3)).view(b, n + 3)).to(dev)
    return batch


class _Trainer:
    """A module (random weights), its AdamW and its batches: ``step(kind)`` is one training step."""

    def __init__(self, s: BenchSettings, checkpointed: bool, warmup_loss: float) -> None:
        from sautomed.guards import weights_from_elsewhere
        from sautomed.models.sautomed.loss import LossWeights
        from sautomed.models.sautomed.module import SAutoMedModule

        self.s = s
        net_cfg = NetworkConfig(**dict(s.network, sam_checkpoint=None, grad_checkpointing=checkpointed))
        torch.manual_seed(s.seed)
        with weights_from_elsewhere():  # speed and memory do not depend on the weights
            loss = LossWeights(**{**s.loss, "warmup": warmup_loss})
            self.module = SAutoMedModule(network=net_cfg, loss=loss).to(s.device)
        self.module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer here
        self.module.train()
        self.opt = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=1e-4)
        self.batches: dict[tuple[int, bool], dict[str, Tensor]] = {}

    @property
    def encoder_frozen(self) -> bool:
        """The module's own condition for the feature cache: no trainable encoder parameter."""
        return not any(p.requires_grad for p in self.module.net.image_encoder.parameters())

    def batch(self, kind: StepKind) -> dict[str, Tensor]:
        """The batch of a step kind; a cached kind's features are put into the cache here (not timed)."""
        key = (kind.warmups, kind.cached)
        if key not in self.batches:
            batch = synthetic_batch(self.s, kind.warmups, keyed=kind.cached)
            if kind.cached:
                with torch.no_grad(), autocast(self.s.device, self.s.dtype):
                    net, cache = self.module.net, self.module._feature_cache
                    encode_window_cached(net, batch["image"], batch["slice_key"], cache)
            self.batches[key] = batch
        return self.batches[key]

    def step(self, kind: StepKind) -> None:
        batch = self.batch(kind)
        with autocast(self.s.device, self.s.dtype):
            loss = self.module.training_step(batch, 0)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def train_worker(s: BenchSettings, checkpointed: bool, timing: bool) -> dict[str, Any]:
    """The config's step's peak memory (its first run), then every step kind's median time (``timing``)."""
    if s.threads:
        torch.set_num_threads(s.threads)
    logging.getLogger("sautomed.models.sautomed.network").setLevel(logging.ERROR)
    main = _Trainer(s, checkpointed, float(s.loss.get("warmup", 0.0)))
    frozen = main.encoder_frozen
    config = config_kind(s, s.feature_cache and frozen)
    main.batch(config)  # batch (and cache) before the probe: the step's own memory is measured

    probe = PeakMemory.start(s.device)
    t0 = time.perf_counter()
    main.step(config)
    sync(s.device)
    first = time.perf_counter() - t0
    peak = probe.peak_mb()
    before = probe.before_mb
    out: dict[str, Any] = {
        "peak_mb": peak,
        "before_mb": before,
        "step_mb": None if before is None else peak - before,
        "memory_method": probe.method,
        "first_step_s": first,
        "encoder_frozen": frozen,
    }
    if timing:
        trainers = {main.module.loss_weights.warmup: main}
        fns = {}
        for kind in step_kinds(s, frozen):
            if kind.warmup_loss not in trainers:  # the before chain's module: no warm-up loss
                trainers[kind.warmup_loss] = _Trainer(s, checkpointed, kind.warmup_loss)
            trainer = trainers[kind.warmup_loss]
            trainer.batch(kind)
            fns[kind.key] = lambda t=trainer, k=kind: t.step(k)
        res = time_interleaved(fns, dict.fromkeys(fns, s.repeats), s.warmup, s.device)
        out["steps"] = {key: v["median"] for key, v in res.items()}
    return out


def run_train_worker(s: BenchSettings, checkpointed: bool, timing: bool) -> dict[str, Any]:
    """Run ``train_worker`` in a fresh Python process; a failed or killed worker is a RuntimeError."""
    spec = json.dumps({"settings": asdict(s), "checkpointed": checkpointed, "timing": timing})
    code = f"from sautomed.bench.worker import worker_main\nworker_main({spec!r})\n"
    proc = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True)  # code on stdin
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        why = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        raise RuntimeError(f"training-step worker failed ({proc.returncode}){why}: " + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_main(spec: str) -> None:
    """The worker process's entry: settings as JSON in, the measures as the last line of stdout."""
    d = json.loads(spec)
    result = train_worker(settings_from_json(d["settings"]), d["checkpointed"], d["timing"])
    print(json.dumps(result))
