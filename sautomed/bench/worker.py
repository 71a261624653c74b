"""One training step measured in a fresh Python process, so that its peak memory is its own.

``SAutoMedModule.training_step`` on a synthetic window batch with n warm-ups, backward and an AdamW step: the
first step's peak memory (`memory.py`), then the median time of further steps.
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

from sautomed.bench.memory import PeakMemory
from sautomed.bench.settings import BenchSettings, autocast
from sautomed.bench.timing import sync, time_it
from sautomed.bench.workload import synthetic_volume
from sautomed.models.sautomed.network import NetworkConfig


def synthetic_batch(s: BenchSettings) -> dict[str, Tensor]:
    """A training batch of the data module's shapes: image (B, n+3, S, S), label (B, S, S), ..."""
    b, n, size = s.train_batch, s.warmup_slices, int(s.network.get("image_size", 256))
    c = int(s.network.get("num_classes", 4))
    g = torch.Generator().manual_seed(s.seed)
    image = torch.stack([synthetic_volume(n + 3, size, seed=s.seed + i) for i in range(b)])  # (B, n+3, S, S)
    index = torch.arange(n + 3).expand(b, -1) + 10  # distinct slices: each encoded once
    field_ = F.interpolate(torch.rand(b, 1, 8, 8, generator=g), size=(size, size), mode="bilinear")[:, 0]
    label = (field_ * (c + 1)).long().clamp(0, c)  # (B, S, S) blobs of every class
    direction = torch.tensor([1 if i % 2 == 0 else -1 for i in range(b)])
    dev = s.device
    warmup_label = label[:, None].expand(-1, n, -1, -1).contiguous()  # (B, n, S, S) for the warm-up loss
    return {
        "image": image.to(dev),
        "index": index.to(dev),
        "label": label.to(dev),
        "warmup_label": warmup_label.to(dev),
        "direction": direction,
    }


def train_worker(s: BenchSettings, checkpointed: bool, timing: bool) -> dict[str, Any]:
    """One training step's peak memory (the first step), then its median time (when ``timing``)."""
    from sautomed.guards import weights_from_elsewhere
    from sautomed.losses import LossWeights
    from sautomed.module import SAutoMedModule

    if s.threads:
        torch.set_num_threads(s.threads)
    net_cfg = NetworkConfig(**dict(s.network, sam_checkpoint=None, grad_checkpointing=checkpointed))
    logging.getLogger("sautomed.models.sautomed.network").setLevel(logging.ERROR)
    torch.manual_seed(s.seed)
    with weights_from_elsewhere():  # speed and memory do not depend on the weights
        module = SAutoMedModule(network=net_cfg, loss=LossWeights(**s.loss)).to(s.device)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer here
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batch = synthetic_batch(s)

    def step() -> None:
        with autocast(s.device, s.dtype):
            loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    probe = PeakMemory.start(s.device)
    t0 = time.perf_counter()
    step()
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
    }
    if timing:  # the memory step above counts as the first warm-up
        out["step_s"] = time_it(step, s.repeats, max(s.warmup - 1, 0), s.device)["median"]
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
    result = train_worker(BenchSettings(**d["settings"]), d["checkpointed"], d["timing"])
    print(json.dumps(result))
