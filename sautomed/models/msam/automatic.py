"""Automatic whole-volume segmentation: sliding windows, a prompt-free pass, then self-prompting.

What ``predict`` does (no ground truth, no user)::

    1. windows of S^3 (stride S * (1 - overlap)) over the (zero-padded) volume; in each, one prompt-free
       iteration (only the padding point, zero previous logits); window logits averaged where they overlap
    2. self-prompting: the connected components of (logits > 0), largest first (up to ``max_components``,
       at least ``min_component_voxels``); for each, a window centred on its interior point (the voxel
       farthest from the component's border) is refined for ``self_prompt_iterations`` iterations, each
       with that point as a positive click and the previous logits (first: the pass-1 logits of the window,
       resized to low-res); the refined logits replace the old ones inside the component's bounding box
       grown by a margin of S/8
    3. components under ``min_component_voxels`` dropped; with ``largest_component`` only the largest kept
       (one lesion a scan, as BraTS's whole tumour; off where scans hold several, as liver or kidney tumours)
    4. labels = logits > 0 on the volume grid

The paper's oracle protocol (crops and clicks placed from the ground truth) is in ``refinement.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from sautomed.models.msam.network import MSAMNet


@dataclass(frozen=True)
class AutoSettings:
    """Settings of the automatic mode.

    Attributes:
        overlap: window overlap fraction in the prompt-free pass (0 <= overlap < 1).
        self_prompt_iterations: refinement iterations per component (0: prompt-free pass only).
        max_components: components refined, largest first.
        min_component_voxels: smaller components are neither refined nor kept (background in the output).
        largest_component: keep only the largest component of the lesion (``predict --largest-component``).
    """

    overlap: float = 0.5
    self_prompt_iterations: int = 2
    max_components: int = 3
    min_component_voxels: int = 20
    largest_component: bool = False


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts covering [0, length) with windows (the last flush with the end); length >= window."""
    starts = list(range(0, length - window + 1, max(1, stride)))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _window(net: MSAMNet, crop: Tensor, points, prev_low: Tensor | None) -> tuple[Tensor, Tensor]:
    """(C, S, S, S) crop -> (low-res logits (1, 1, 4g^3), full logits (S, S, S))."""
    low = net.decode(net.encode(crop[None]), points, prev_low)
    return low, net.upscale(low)[0, 0]


def interior_point(component: np.ndarray) -> tuple[int, int, int]:
    """The voxel of a boolean component farthest from its border (ties: the first)."""
    dist = ndimage.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1, 1:-1]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(dist)), component.shape))


@torch.no_grad()
def segment_automatic(net: MSAMNet, volume: Tensor, settings: AutoSettings = AutoSettings()) -> Tensor:  # noqa: B008
    """(C, Z, Y, X) preprocessed volume (C input channels; (Z, Y, X) for one) -> (Z, Y, X) float logits of
    the lesion (> 0: lesion)."""
    s = net.config.image_size
    volume = volume if volume.dim() == 4 else volume[None]
    shape = tuple(volume.shape[1:])
    padded = tuple(max(n, s) for n in shape)
    vol = F.pad(volume.float(), [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]])
    every = (slice(None),)  # all channels
    stride = max(1, int(round(s * (1 - settings.overlap))))
    total = torch.zeros(padded, device=vol.device)
    count = torch.zeros(padded, device=vol.device)
    for z in window_starts(padded[0], s, stride):  # 1. prompt-free pass
        for y in window_starts(padded[1], s, stride):
            for x in window_starts(padded[2], s, stride):
                box = (slice(z, z + s), slice(y, y + s), slice(x, x + s))
                _, logits = _window(net, vol[every + box], None, None)
                total[box] += logits
                count[box] += 1
    logits = total / count
    if settings.self_prompt_iterations > 0:  # 2. self-prompting
        labelled, n = ndimage.label((logits > 0).cpu().numpy())
        sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
        order = [int(i) + 1 for i in np.argsort(-sizes) if sizes[i] >= settings.min_component_voxels]
        margin = s // 8
        for comp_id in order[: settings.max_components]:
            comp = labelled == comp_id
            point = interior_point(comp)
            start = [min(max(p - s // 2, 0), n_ - s) for p, n_ in zip(point, padded)]
            box = tuple(slice(a, a + s) for a in start)
            prev = F.interpolate(logits[box][None, None], size=net.low_res_size, mode="trilinear")
            click = torch.tensor([[[p - a for p, a in zip(point, start)]]], device=vol.device)
            emb = net.encode(vol[every + box][None])
            for _ in range(settings.self_prompt_iterations):
                prev = net.decode(emb, (click, torch.ones(1, 1, dtype=torch.long, device=vol.device)), prev)
            refined = net.upscale(prev)[0, 0]  # (S, S, S) in the window
            where = np.argwhere(comp)
            lo = np.maximum(where.min(0) - margin, start)
            hi = np.minimum(where.max(0) + margin + 1, np.array(start) + s)
            region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            local = tuple(slice(int(a - st), int(b - st)) for a, b, st in zip(lo, hi, start))
            logits[region] = refined[local]
    logits = drop_components(logits, settings.min_component_voxels, settings.largest_component)
    return logits[: shape[0], : shape[1], : shape[2]]


def drop_components(logits: Tensor, min_voxels: int, largest_only: bool = False) -> Tensor:
    """(Z, Y, X) lesion logits with the components of ``logits > 0`` (face-connected, as the self-prompting's)
    under ``min_voxels``, and with ``largest_only`` every component but the largest, set to at most -1."""
    labelled, n = ndimage.label((logits > 0).cpu().numpy())
    if n == 0:
        return logits
    sizes = np.bincount(labelled.ravel(), minlength=n + 1)
    drop = sizes < min_voxels
    if largest_only:
        drop |= np.arange(n + 1) != 1 + int(np.argmax(sizes[1:]))
    drop[0] = False
    where = torch.from_numpy(drop[labelled]).to(logits.device)
    return torch.where(where, torch.minimum(logits, torch.full_like(logits, -1.0)), logits)
