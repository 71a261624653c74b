"""Peak memory of one training step, measured on this machine, and the batch and patch sizes it allows.

`sautomed plan` asks :func:`fit_batch_to_memory` for the U-Nets and M-SAM: one forward and backward pass of
the planned network (random weights and inputs: memory does not depend on them) at batch 1 and 2, measured
in a fresh process on a CPU (its peak resident memory, ``ru_maxrss``: the interpreter, torch and the step, as
a fit's process holds them) or with ``torch.cuda.max_memory_allocated`` on a GPU. The peak is taken as
``fixed + batch x per_sample`` from the two; the plan keeps the template's batch when it fits the memory
limit (``MEMORY_SHARE`` of the machine's memory, or of the GPU's, less the preprocessed data a fit holds),
lowers it when it does not, and halves the patch (M-SAM: the crop) while even batch 1 does not fit.
The 3D-SAutoMed family with its frozen, cached encoder is sized by its feature cache instead (plan.py).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from sautomed.data.fingerprint import Fingerprint
from sautomed.errors import UserError

MEMORY_SHARE = 0.7  # of the machine's (or the GPU's) memory a training step may take; the rest: the OS, data
GIB = 2**30


@dataclass(frozen=True)
class StepMemory:
    """A training step's peak as ``fixed + batch x per_sample`` bytes, measured at batch 1 and 2."""

    fixed: int
    per_sample: int

    def at(self, batch: int) -> int:
        return self.fixed + batch * self.per_sample


def _network_and_step(family: str, model: dict[str, Any]) -> tuple[Any, Any]:
    """(network, step(batch) -> None): one forward and backward pass of its training, on random data."""
    import torch

    if family in ("unet2d", "unet3d"):
        from sautomed.models.baselines.network import UNetSettings, build_unet

        s = UNetSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in model["unet"].items()})
        net = build_unet(family, s)  # type: ignore[arg-type]
        channels = s.in_channels + 2 * s.context_slices

        def step(batch: int) -> None:
            out = net(torch.rand(batch, channels, *s.patch_size))
            out.float().mean().backward()

        return net, step
    if family == "msam":
        from sautomed.models.msam.network import MSAMConfig, MSAMNet
        from sautomed.models.msam.refinement import refine_with_clicks

        cfg = MSAMConfig(**{k: v for k, v in model.get("network", {}).items() if k != "sam_med3d_checkpoint"})
        net = MSAMNet(cfg)
        iterations = int(model.get("refinement", {}).get("iterations", 11))
        S = cfg.image_size

        def step(batch: int) -> None:
            image = torch.rand(batch, cfg.in_channels, S, S, S)
            target = torch.zeros(batch, 1, S, S, S)
            target[..., S // 4 : 3 * S // 4, S // 4 : 3 * S // 4, S // 4 : 3 * S // 4] = 1
            gen = torch.Generator().manual_seed(0)
            res = refine_with_clicks(net, image, target, iterations, gen)
            sum(lg.float().mean() for lg in res.logits).backward()

        return net, step
    raise UserError(f"no training-step memory probe for the family {family!r}")


def _measure(family: str, model: dict[str, Any], device: str) -> dict[str, int]:
    """Peaks after a step at batch 1, then 2 (bytes), in this process (the CPU peak is the process's)."""
    import resource

    import torch

    torch.manual_seed(0)
    net, step = _network_and_step(family, model)
    dev = torch.device(device)
    net.to(dev)
    peaks = {}
    for batch in (1, 2):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            with torch.device(dev):
                step(batch)
            torch.cuda.synchronize(dev)
            peaks[str(batch)] = int(torch.cuda.max_memory_allocated(dev))
        else:
            step(batch)
            peaks[str(batch)] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
        net.zero_grad(set_to_none=True)
    return peaks


def measure_step(family: str, model: dict[str, Any], device: str = "cpu") -> StepMemory:
    """The training step's memory on ``device``: on a CPU in a fresh process (its peak resident memory
    includes torch and the interpreter, as a fit's does), on a GPU in this one."""
    if device == "cuda":
        peaks = _measure(family, model, "cuda")
    else:
        arg = json.dumps({"family": family, "model": model})
        done = subprocess.run(
            [sys.executable, "-m", "sautomed.tools.memory", arg], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"measuring a {family} training step's memory failed: {tail}")
        peaks = json.loads(done.stdout.strip().splitlines()[-1])
    one, two = peaks["1"], peaks["2"]
    per = max(0, two - one)
    return StepMemory(fixed=max(0, one - per), per_sample=per)


def largest_batch(memory: StepMemory, limit: int, most: int) -> int:
    """The largest batch in 1..``most`` whose step fits ``limit`` bytes; 0 when not even batch 1 does."""
    if memory.per_sample <= 0:
        return most if memory.fixed <= limit else 0
    return max(0, min(most, math.floor((limit - memory.fixed) / memory.per_sample)))


def _halved(family: str, model: dict[str, Any]) -> dict[str, Any] | None:
    """The model settings with the patch (M-SAM: the crop) halved, or None when it cannot shrink further."""
    model = json.loads(json.dumps(model))
    if family in ("unet2d", "unet3d"):
        patch = model["unet"]["patch_size"]
        smaller = [max(8, p // 2 // 8 * 8) if p >= 16 else p for p in patch]
        if smaller == patch:
            return None
        model["unet"]["patch_size"] = smaller
        return model
    size = int(model["network"].get("image_size", 128))
    if size <= 32:
        return None
    model["network"]["image_size"] = size // 2
    return model


def fit_batch_to_memory(
    family: str, model: dict[str, Any], batch: int, limit: int, device: str = "cpu"
) -> tuple[dict[str, Any], int, StepMemory, list[str]]:
    """(model settings, batch size, the step's memory, notes): the template's ``batch`` if its step fits
    ``limit`` bytes, else the largest that does, else the patch halved (at most twice) until batch 1 fits.

    Raises UserError when even the smallest patch at batch 1 does not fit."""
    notes = []
    for _ in range(3):
        memory = measure_step(family, model, device)
        fits = largest_batch(memory, limit, batch)
        where = "GPU" if device == "cuda" else "process"
        notes.append(
            f"a training step measured here: {memory.fixed / GIB:.2f} GiB + "
            f"{memory.per_sample / GIB:.2f} GiB a sample ({where} peak); limit {limit / GIB:.1f} GiB"
        )
        if fits >= 1:
            if fits < batch:
                notes.append(f"batch size {fits}, down from {batch}, to fit the memory")
            else:
                notes.append(f"batch size {batch}: {memory.at(batch) / GIB:.2f} GiB, fits the memory")
            return model, fits, memory, notes
        smaller = _halved(family, model)
        if smaller is None:
            break
        key = "unet.patch_size" if family != "msam" else "network.image_size"
        old = model["unet"]["patch_size"] if family != "msam" else model["network"]["image_size"]
        new = smaller["unet"]["patch_size"] if family != "msam" else smaller["network"]["image_size"]
        notes.append(f"batch 1 does not fit: {key} {old} -> {new}")
        model = smaller
    raise UserError(
        f"a {family} training step at batch 1 needs {memory.at(1) / GIB:.2f} GiB, over the "
        f"{limit / GIB:.1f} GiB this machine allows it: plan for a machine with more memory (--memory)"
    )


def data_bytes(fp: Fingerprint, image_size: int, channels: int) -> int:
    """The preprocessed cases a fit holds in memory: float32 slices of S x S per channel and a uint8 label."""
    slices = sum(shape[0] for shape in fp.shapes_zyx)
    return int(slices * image_size * image_size * (4 * channels + 1))


def size_batch(
    fp: Fingerprint,
    family: str,
    model: dict[str, Any],
    data: dict[str, Any],
    image_size: int,
    channels: int,
    device: str,
    memory_bytes: int | None,
) -> list[str]:
    """Set ``data.batch_size`` (and shrink the patch or crop if it must) from a training step measured on
    this machine against its memory (memory.py); notes saying what it measured and chose."""
    from sautomed.models.sautomed.feature_cache import machine_memory_bytes

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return ["no GPU here: the training step's memory was not measured; the template's batch is kept"]
        memory = memory_bytes or int(torch.cuda.get_device_properties(0).total_memory)
        held = 0  # the cases stay in host memory
    else:
        memory = memory_bytes or machine_memory_bytes() or 8 * GIB
        held = data_bytes(fp, image_size, channels)
    limit = int(MEMORY_SHARE * memory) - held
    notes = [
        f"memory: {memory / GIB:.1f} GiB "
        + ("given (--memory)" if memory_bytes else ("on the GPU" if device == "cuda" else "on this machine"))
        + f"; a step may take {MEMORY_SHARE:.0%} of it"
        + (f" less {held / GIB:.2f} GiB of preprocessed cases" if held else "")
    ]
    batch = int(data.get("batch_size", 2))
    model_now = {key: model[key] for key in ("unet", "network", "refinement") if key in model}
    sized, data["batch_size"], _, more = fit_batch_to_memory(family, model_now, batch, limit, device)
    model.update(sized)
    if family == "unet3d":
        data.setdefault("patches", {})["size"] = sized["unet"]["patch_size"]
    if family == "msam":
        data.setdefault("crops", {})["size"] = sized["network"]["image_size"]
    return notes + more


def memory_size(text: str) -> int:
    """``16G``, ``512M``, ``16GiB`` -> bytes (binary units)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt])?(?:i?b)?", text.strip().lower())
    if not match:
        raise UserError(f"--memory {text!r}: give a size such as 16G or 512M")
    power = " kmgt".index(match.group(2) or " ")
    return int(float(match.group(1)) * 1024**power)


if __name__ == "__main__":  # the CPU probe: one fresh process, its peaks as JSON on the last line
    spec = json.loads(sys.argv[1])
    print(json.dumps(_measure(spec["family"], spec["model"], "cpu")))
