"""What is measured: the network (random weights), a synthetic volume, the naive baseline, encoder FLOPs."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from sautomed.bench.settings import BenchSettings, autocast
from sautomed.evaluation.postprocess import logits_to_labels
from sautomed.models.sautomed.network import NetworkConfig, SAutoMedNet


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


@torch.no_grad()
def naive_loop(net: SAutoMedNet, volume: Tensor, out_hw: tuple[int, int], dtype: str = "fp32") -> Tensor:
    """The per-slice baseline: for each slice t, one encoder call on t-1, t, t+1 (clamped), one batch-1 step.

    (Z, S, S) volume -> (Z, H, W) labels; 3Z slice encodings where the engine needs Z.
    """
    z = volume.shape[0]
    device = volume.device
    state = net.initial_state(1, device)
    labels = []
    with autocast(device.type, dtype):
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
        with torch.no_grad(), autocast(device, dtype), counter:
            net.encode(torch.rand(1, size, size, device=device))
        return counter.get_total_flops() / 1e9
    finally:
        for p, f in zip(net.parameters(), flags):
            p.requires_grad_(f)
