"""A training window through the network: each distinct slice encoded once, neighbours in processing order.

A window is the slices ``t-(n+1)d .. t+d`` of one volume in processing order (``d`` = +1 or -1, as the data's
``WindowDataset`` cuts it): positions ``0..n-1`` are needed only by the ``n`` warm-up steps, positions
``n..n+2`` (the target at ``n+1`` and its two neighbours) by the target step. Windows clamped at a volume's
end repeat a slice index; a repeat reuses the first encoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sautomed.models.sautomed.feature_cache import FeatureCache
from sautomed.models.sautomed.network import SAutoMedNet


def encode_window(net: SAutoMedNet, image: Tensor, index: Tensor, n: int) -> Tensor:
    """(B, n+3, S, S) window, (B, n+3) slice indices -> (B, n+3, D, h, w) features.

    Slices needed only by warm-ups are encoded in one batched no-grad pass; the target's slices in one
    batched pass with gradients. Each distinct slice of a window is encoded exactly once.
    """
    b, length = index.shape
    src = torch.arange(length).expand(b, length).clone()  # (B, L): position whose encoding each one uses
    for k in range(1, length):
        same = index[:, k] == index[:, k - 1]
        src[same, k] = src[same, k - 1]
    grad_src = src[:, n:]  # (B, 3)
    no_grad_sel = [(i, k) for i in range(b) for k in range(n) if src[i, k] == k and k not in grad_src[i]]
    grad_sel = [(i, k) for i in range(b) for k in sorted(set(grad_src[i].tolist()))]
    feats: dict[tuple[int, int], Tensor] = {}
    if no_grad_sel:
        with torch.no_grad():
            f = net.encode(torch.stack([image[i, k] for i, k in no_grad_sel]))  # (N, D, h, w)
        feats.update(zip(no_grad_sel, f))
    f = net.encode(torch.stack([image[i, k] for i, k in grad_sel]))  # (M, D, h, w)
    feats.update(zip(grad_sel, f))
    return torch.stack([torch.stack([feats[(i, int(src[i, k]))] for k in range(length)]) for i in range(b)])


def neighbours(feats: Tensor, direction: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Spatial (t-1, t+1) features of the slice at processing position k.

    feats: (B, L, D, h, w) window features; direction: (B,) +1 or -1. Processing position k-1 is spatial
    t-1 when the window runs upwards (d = +1) and t+1 when it runs downwards. Returns two (B, D, h, w).
    """
    d = direction.to(feats.device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    before, after = feats[:, k - 1], feats[:, k + 1]
    return torch.where(d > 0, before, after), torch.where(d > 0, after, before)


def encode_window_cached(
    net: SAutoMedNet, image: Tensor, keys: Tensor, cache: FeatureCache | dict[int, Tensor]
) -> Tensor:
    """A frozen encoder's window features, each slice encoded once per run and kept in ``cache``.

    image: (B, L, S, S) window; keys: (B, L) stable slice identities (the data's ``slice_key``: a slice of
    one fixed augmented copy of a volume). Missing slices are encoded without gradients in one batch and
    stored as float16 (half the memory; the features are layer-normed, so the rounding is ~1e-3 relative).
    Returns (B, L, D, h, w) float32 features without gradients.
    """
    b, length = keys.shape
    flat = keys.reshape(-1).tolist()
    missing: dict[int, tuple[int, int]] = {}
    for pos, key in enumerate(flat):
        if key not in cache and key not in missing:
            missing[key] = divmod(pos, length)
    if missing:
        with torch.no_grad():
            f = net.encode(torch.stack([image[i, k] for i, k in missing.values()]))  # (M, D, h, w)
        for key, feat in zip(missing, f):
            cache[key] = feat.to(torch.float16).clone()
    feats = torch.stack([cache[k] for k in flat]).to(image.device, torch.float32)  # (B*L, D, h, w)
    return feats.view(b, length, *feats.shape[1:])
