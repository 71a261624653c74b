"""`sautomed bench`: speed and memory of 3D-SAutoMed volume inference and of one training step.

    sautomed bench --config configs/btcv.yaml --model vit_b --image-size 512 --slices 16 --classes 8 \\
        --json bench.json

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
  step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sautomed.inference import InferenceEngine, logits_to_labels
from sautomed.models.sautomed.network import NetworkConfig, SAutoMedNet

log = logging.getLogger(__name__)

BACKBONES = ("tiny", "vit_b", "vit_l", "vit_h")
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


@dataclass
class BenchSettings:
    """Everything one bench run depends on (the config's values, overridden by the flags)."""

    network: dict[str, Any] = field(default_factory=dict)  # NetworkConfig fields
    slices: int = 16
    out_size: int = 512
    encode_chunk: int = 8
    train_batch: int = 8
    warmup_slices: int = 3  # n: the config's warmup_max
    loss: dict[str, Any] = field(default_factory=dict)
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


# ------------------------------------------------------------------------------------------------ settings
def _section(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    sec = cfg.get(key) or {}
    return dict(sec.get("init_args", sec)) if isinstance(sec, dict) else {}


def settings_from_args(a: argparse.Namespace) -> BenchSettings:
    """Config YAML defaults (network, batch size, warm-ups, classes, S, chunk), overridden by the flags."""
    import yaml

    cfg: dict[str, Any] = {}
    if a.config is not None:
        if not Path(a.config).is_file():
            raise FileNotFoundError(f"{a.config}: config not found")
        cfg = yaml.safe_load(Path(a.config).read_text()) or {}
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
    s = BenchSettings(
        network=network,
        slices=a.slices,
        out_size=a.out_size,
        encode_chunk=a.encode_chunk or int((model.get("inference") or {}).get("encode_chunk", 8)),
        train_batch=a.train_batch if a.train_batch is not None else int(data.get("batch_size", 8)),
        warmup_slices=a.warmup_slices if a.warmup_slices is not None else int(windows.get("warmup_max", 3)),
        loss=dict(model.get("loss") or {}),
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
        raise ValueError("--slices, --repeats and --train-batch must be >= 1; --warmup, --warmup-slices >= 0")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    return s


def _autocast_dtype(dtype: str) -> torch.dtype | None:
    return torch.bfloat16 if dtype == "bf16" else None


def _autocast(device: str, dtype: str) -> Any:
    ad = _autocast_dtype(dtype)
    return torch.autocast(device, dtype=ad) if ad is not None else nullcontext()


# ------------------------------------------------------------------------------------------------ pieces
def build_net(s: BenchSettings, grad_checkpointing: bool | None = None) -> SAutoMedNet:
    """The network with random weights (quietly: the no-checkpoint warning is expected here)."""
    net_log = logging.getLogger("sautomed.models.sautomed.network")
    level = net_log.level
    net_log.setLevel(logging.ERROR)
    try:
        cfg = dict(s.network, sam_checkpoint=None)
        if grad_checkpointing is not None:
            cfg["grad_checkpointing"] = grad_checkpointing
        torch.manual_seed(s.seed)
        return SAutoMedNet(NetworkConfig(**cfg))
    finally:
        net_log.setLevel(level)


def synthetic_volume(slices: int, size: int, seed: int = 0, device: str = "cpu") -> Tensor:
    """(Z, S, S) smooth random intensities in [0, 1] (a coarse random field, upsampled)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(slices, 1, max(2, size // 32), max(2, size // 32), generator=g)
    vol = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    vol = vol + 0.05 * torch.rand(slices, size, size, generator=g)
    return vol.clamp(0, 1).to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], Any], repeats: int, warmup: int, device: str = "cpu") -> dict[str, Any]:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` uncounted ones."""
    return time_interleaved({"fn": fn}, {"fn": repeats}, warmup, device)["fn"]


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: dict[str, int],
    warmup: int,
    device: str = "cpu",
    first_run_in: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Median wall time of each function, the functions taking turns (round-robin).

    Round k runs every function once, so a slow drift of the machine (other work starting or stopping)
    touches all of them alike and their ratios stay meaningful. The first ``warmup`` rounds are not counted;
    function f takes part in ``warmup + repeats[f]`` rounds. ``first_run_in[f]``: a context-manager factory
    the first run of f runs inside (e.g. an encoder-call counter). Returns, per function, the median, every
    timed run, the first run's time and the last result.
    """
    out: dict[str, dict[str, Any]] = {k: {"all": [], "first": None, "result": None} for k in fns}
    for i in range(warmup + max(repeats.values(), default=0)):
        for name, fn in fns.items():
            if i >= warmup + repeats[name]:
                continue
            factory = (first_run_in or {}).get(name)
            with factory() if (factory is not None and i == 0) else nullcontext():
                _sync(device)
                t0 = time.perf_counter()
                out[name]["result"] = fn()
                _sync(device)
                dt = time.perf_counter() - t0
            out[name]["first"] = dt if i == 0 else out[name]["first"]
            if i >= warmup:
                out[name]["all"].append(dt)
    for v in out.values():
        v["median"] = statistics.median(v["all"])
    return out


@contextmanager
def count_encoded(net: SAutoMedNet) -> Iterator[list[int]]:
    """Record the number of slices of every ``net.encode`` call (instance-level wrapper)."""
    calls: list[int] = []
    original = net.encode
    previous = net.__dict__.get("encode")  # an instance-level override (e.g. a compiled encode)

    def counting(images: Tensor) -> Tensor:
        calls.append(int(images.shape[0]))
        return original(images)

    net.encode = counting  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        if previous is None:
            del net.encode  # the class method again
        else:
            net.encode = previous  # type: ignore[method-assign]


@torch.no_grad()
def naive_loop(net: SAutoMedNet, volume: Tensor, out_hw: tuple[int, int], dtype: str = "fp32") -> Tensor:
    """The per-slice baseline (see the module docstring): 3 slice encodings and one step per slice."""
    z = volume.shape[0]
    device = volume.device
    state = net.initial_state(1, device)
    labels = []
    with _autocast(device.type, dtype):
        for t in range(z):
            window = volume[[max(t - 1, 0), t, min(t + 1, z - 1)]]  # (3, S, S)
            f = net.encode(window).float()  # (3, D, h, w): t-1, t, t+1
            out = net.step(f[0:1], f[1:2], f[2:3], state)
            state = out.state
            labels.append(logits_to_labels(out.logits.float(), out_hw))
    return torch.cat(labels, 0)


def encoder_gflop_per_slice(net: SAutoMedNet, size: int, device: str, dtype: str) -> float:
    """FLOPs of ``net.encode`` on one slice (``torch.utils.flop_counter``), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    flags = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)  # the counter's module tracker needs no-grad inputs to carry no grad flag
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), _autocast(device, dtype), counter:
            net.encode(torch.rand(1, size, size, device=device))
        return counter.get_total_flops() / 1e9
    finally:
        for p, f in zip(net.parameters(), flags):
            p.requires_grad_(f)


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine shows here."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def mid_to_ends_batches(slices: int) -> list[int]:
    """Batch size of every sequential step of mid_to_ends (the middle slice, then both chains)."""
    mid = slices // 2
    down, up = mid, slices - 1 - mid
    return [1] + [2] * min(down, up) + [1] * abs(down - up)


def predicted_ratio(slices: int, step1: float, step2: float) -> float:
    """propagation mid_to_ends / end_to_end if it were only decoder steps of the measured costs."""
    return sum(step1 if b == 1 else step2 for b in mid_to_ends_batches(slices)) / (slices * step1)


def machine_info(device: str) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------------ training
def _rss_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _synthetic_batch(s: BenchSettings) -> dict[str, Tensor]:
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
    batch = _synthetic_batch(s)

    def step() -> None:
        with _autocast(s.device, s.dtype):
            loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cuda = s.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        method = "torch.cuda.max_memory_allocated"
    else:
        before = _rss_mb("VmRSS")
        method = "VmHWM (peak RSS) after clear_refs" if _reset_peak_rss() else "ru_maxrss"
    t0 = time.perf_counter()
    step()
    _sync(s.device)
    first = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = _rss_mb("VmHWM") if method.startswith("VmHWM") else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out: dict[str, Any] = {
        "peak_mb": peak,
        "before_mb": before,
        "step_mb": None if before is None else peak - before,
        "memory_method": method,
        "first_step_s": first,
    }
    if timing:  # the memory step above counts as the first warm-up
        out["step_s"] = time_it(step, s.repeats, max(s.warmup - 1, 0), s.device)["median"]
    return out


def _run_train_worker(s: BenchSettings, checkpointed: bool, timing: bool) -> dict[str, Any]:
    """Run ``train_worker`` in a fresh Python process (a clean peak-memory measure)."""
    spec = json.dumps({"settings": asdict(s), "checkpointed": checkpointed, "timing": timing})
    code = f"from sautomed.bench import _worker_main\n_worker_main({spec!r})\n"
    proc = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True)  # code on stdin
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        why = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        raise RuntimeError(f"training-step worker failed ({proc.returncode}){why}: " + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_main(spec: str) -> None:
    d = json.loads(spec)
    result = train_worker(BenchSettings(**d["settings"]), d["checkpointed"], d["timing"])
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------------ the bench
def run_bench(
    s: BenchSettings,
    progress: Callable[[str], None] = lambda m: None,
    partial: Callable[[dict[str, Any]], None] = lambda r: None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure everything (see the module docstring); returns the result dict written as JSON.

    ``partial`` receives the results so far after every measure (a long run that dies leaves them behind);
    ``resume``: such partial results of the same settings: their measures are kept, not run again (listed
    under ``resumed``).
    """
    if s.threads:
        torch.set_num_threads(s.threads)
    dev = s.device
    net = build_net(s).eval().to(dev)
    size = net.cfg.image_size
    n = s.slices
    volume = synthetic_volume(n, size, s.seed, dev)
    out_hw = (s.out_size, s.out_size)
    ad = _autocast_dtype(s.dtype)
    engines = {m: InferenceEngine(net, m, s.encode_chunk, ad) for m in ("mid_to_ends", "end_to_end")}
    settings = {
        "backbone": s.network.get("backbone"),
        "image_size": size,
        "slices": n,
        "classes": s.network.get("num_classes"),
        "out_size": s.out_size,
        "encode_chunk": s.encode_chunk,
        "train_batch": s.train_batch,
        "train_warmup_slices": s.warmup_slices,
        "repeats": s.repeats,
        "naive_repeats": s.naive_repeats or s.repeats,
        "warmup": s.warmup,
        "compile": s.compile,
        "naive_loop": "per slice: encode [t-1, t, t+1] (clamped) in one call, a batch-1 step, resize, argmax",
        "device": dev,
        "dtype": s.dtype,
        "threads": torch.get_num_threads(),
    }
    r: dict[str, Any] = {"settings": settings, "load_average_start": _loadavg(), "resumed": []}
    if resume is not None and resume.get("settings") != settings:
        raise ValueError("--resume: the partial results were measured with other settings")
    old = resume or {}

    gflop_slice = encoder_gflop_per_slice(net, size, dev, s.dtype)
    compile_s = None
    if s.compile:
        net.encode = torch.compile(net.encode)  # type: ignore[method-assign]
        progress("compiling the encoder")
        t0 = time.perf_counter()
        engines["mid_to_ends"].encode_volume(volume)
        _sync(dev)
        compile_s = time.perf_counter() - t0

    def timed(group: dict[str, Callable[[], Any]], count: tuple[str, ...] = ()) -> dict[str, Any]:
        """Time a group of measures in turns; their medians into r[name + "_s"], results returned.

        ``count``: names whose first run's encoder calls go into r too. A measure found in ``resume`` is
        kept from there and not run.
        """
        todo = {}
        for name, fn in group.items():
            keys = [name + "_s", name + "_all_s"]
            keys += [f"encoded_slices_{name}", f"encoder_calls_{name}"] if name in count else []
            if all(old.get(k) is not None for k in keys):
                r.update({k: old[k] for k in keys})
                r["resumed"].append(name)
            else:
                todo[name] = fn
        if not todo:
            return {}
        progress(", ".join(todo) + " (in turns)")
        counters: dict[str, list[int]] = {name: [] for name in todo}

        def counting(name: str) -> Callable[[], Any]:
            @contextmanager
            def ctx() -> Iterator[None]:
                with count_encoded(net) as calls:
                    yield
                counters[name].extend(calls)

            return ctx

        reps = {
            name: s.naive_repeats if name == "naive_loop" and s.naive_repeats else s.repeats for name in todo
        }
        firsts = {name: counting(name) for name in todo if name in count}
        res = time_interleaved(todo, reps, s.warmup, dev, firsts)
        for name, t in res.items():
            r[name + "_s"], r[name + "_all_s"] = t["median"], t["all"]
            if name in count:
                r[f"encoded_slices_{name}"] = sum(counters[name])
                r[f"encoder_calls_{name}"] = len(counters[name])
        partial(r)
        return {name: t["result"] for name, t in res.items()}

    # whole volumes: the encoder alone, both modes, the naive loop, in turns
    group = {
        "encoder_only": lambda: engines["mid_to_ends"].encode_volume(volume),
        "volume_mid_to_ends": lambda: engines["mid_to_ends"].segment(volume, out_hw),
        "volume_end_to_end": lambda: engines["end_to_end"].segment(volume, out_hw),
    }
    if s.naive:
        group["naive_loop"] = lambda: naive_loop(net, volume, out_hw, s.dtype)
    timed(group, count=("volume_mid_to_ends", "volume_end_to_end", "naive_loop"))
    r["encoded_slices_engine"] = r["encoded_slices_volume_mid_to_ends"]
    r["encoded_slices_naive"] = r.get("encoded_slices_naive_loop")
    r.setdefault("naive_loop_s", None)

    # after the encoder: propagation in both modes, and one decoder step at batch 1 and 2, in turns
    feats = engines["mid_to_ends"].encode_volume(volume)
    group = {mode: (lambda e=eng: e.propagate(feats)) for mode, eng in engines.items()}
    group = {f"propagation_{mode}": fn for mode, fn in group.items()}
    for batch in (1, 2):  # what batching the two chains costs
        f = feats[:batch].expand(batch, -1, -1, -1) if n < batch else feats[:batch]
        state = net.initial_state(batch, feats.device)

        def one_step(f: Tensor = f, state: Any = state) -> Any:
            with torch.no_grad(), _autocast(dev, s.dtype):
                return net.step(f, f, f, state)

        group[f"step_batch{batch}"] = one_step
    timed(group)
    r["encoder_gflop_per_slice"] = gflop_slice
    r["encoder_gflop"] = gflop_slice * n
    r["encoder_gflops_per_s"] = r["encoder_gflop"] / r["encoder_only_s"]
    r["compile_s"] = compile_s

    r.update(dict.fromkeys(("train_step_s", "train_peak_mb", "train_step_mb", "train_peak_mb_checkpointed")))
    if s.train:
        # A step that does not fit (the worker is killed, e.g. out of memory) is recorded in train_error /
        # train_error_checkpointed and the bench goes on: the other measures stand.
        if old.get("train_step_s") is not None or old.get("train_error") is not None:
            plain_keys = ("train_step_s", "train_first_step_s", "train_peak_mb", "train_step_mb")
            r.update({k: old.get(k) for k in (*plain_keys, "train_memory_method", "train_error")})
            r["resumed"].append("train")
        else:
            progress(f"training step (batch {s.train_batch}, {s.warmup_slices} warm-ups)")
            try:
                plain = _run_train_worker(s, checkpointed=False, timing=True)
                r.update(
                    train_step_s=plain["step_s"],
                    train_first_step_s=plain["first_step_s"],
                    train_peak_mb=plain["peak_mb"],
                    train_step_mb=plain["step_mb"],
                    train_memory_method=plain["memory_method"],
                )
            except RuntimeError as exc:
                r["train_error"] = str(exc)
                progress(f"training step failed: {exc}")
            partial(r)
        ckpt_keys = ("train_peak_mb", "train_step_mb", "train_first_step_s")
        if old.get("train_peak_mb_checkpointed") is not None or old.get("train_error_checkpointed"):
            r.update({f"{k}_checkpointed": old.get(f"{k}_checkpointed") for k in ckpt_keys})
            r["train_error_checkpointed"] = old.get("train_error_checkpointed")
            r["resumed"].append("train_checkpointed")
        else:
            progress("training step with gradient checkpointing")
            try:
                ckpt = _run_train_worker(s, checkpointed=True, timing=False)
                r.update({f"{k}_checkpointed": ckpt[k.removeprefix("train_")] for k in ckpt_keys})
                r.setdefault("train_memory_method", ckpt["memory_method"])
            except RuntimeError as exc:
                r["train_error_checkpointed"] = str(exc)
                progress(f"checkpointed training step failed: {exc}")

    r["targets"] = evaluate_targets(r)
    r["load_average_end"] = _loadavg()
    r["mid_to_ends_predicted_ratio"] = predicted_ratio(n, r["step_batch1_s"], r["step_batch2_s"])
    r["machine"] = machine_info(dev)
    r["device"] = dev
    r["dtype"] = s.dtype
    r["threads"] = torch.get_num_threads()
    r["torch"] = torch.__version__
    return r


def evaluate_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sautomed bench",
        description="Speed and memory of volume inference and of one training step (random weights).",
    )
    p.add_argument("--config", type=Path, help="a sautomed config: network, batch size, warm-ups (defaults)")
    p.add_argument("--model", choices=BACKBONES, help="backbone (overrides the config)")
    p.add_argument("--image-size", type=int, help="input size S (overrides the config)")
    p.add_argument("--slices", type=int, default=16, help="slices N of the synthetic volume")
    p.add_argument("--classes", type=int, help="foreground classes C (overrides the config)")
    p.add_argument("--out-size", type=int, default=512, help="in-plane size the labels are resized to")
    p.add_argument("--encode-chunk", type=int, help="slices per encoder call (default: the config's, or 8)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = bfloat16 autocast")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measure (median)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted runs before the timed ones")
    p.add_argument(
        "--naive-repeats", type=int, help="timed runs of the (3x slower) naive loop (default: --repeats)"
    )
    p.add_argument("--train-batch", type=int, help="training batch size (default: the config's)")
    p.add_argument("--warmup-slices", type=int, help="training warm-up slices n (default: warmup_max)")
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


def bench_main(argv: Sequence[str]) -> int:
    """`sautomed bench ...`: prints the table and PASS/FAIL lines; exit 0 whatever the targets say."""
    a = build_parser().parse_args(list(argv))
    s = settings_from_args(a)

    def write(r: dict[str, Any], complete: bool) -> None:
        if a.json is not None:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({**r, "complete": complete}, indent=2) + "\n")

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
