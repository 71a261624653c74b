"""Dense class proposals on the encoder's features (our addition, ``network.dense_head``, off by default).

A small convolutional head reads a slice's encoder features with its two neighbours' (3D context on the
features themselves, as the slice attention has it) and predicts every class at each feature position. It is
a two-stage DETR's dense proposal (DINO's query selection): it hands the box prompt generator an anchor for a
class the previous slice did not have, and it says whether a class is in the slice (the presence that gates
the per-class decoder's logits). The chain then no longer loses an organ it never saw at the middle slice.

Why: on 3 training cases the box generator's queries and presence head do not carry over to an unseen case
(chaosmr_001 held out: both kidneys present in the slices, presence logits -2 to -5, kidney DSC 0.08 / 0.0),
while a dense head on the same frozen LiteMedSAM features, trained on the same 3 cases, finds all four organs
there (0.93 / 0.91 / 0.90 / 0.82 at the 32 x 32 grid; docs/results.md). Every feature position is a training
sample for it; a box query is one.

Training: its own loss (cross-entropy + soft Dice at the feature grid) on every chain step, and, with a frozen
encoder and fixed augmented copies, ``pretrain_dense_head`` first: every slice of every copy encoded once (the
chain's feature cache, which the chain then reads), and the head trained on all of them. Under a clock
schedule (``model.schedule_by: clock``) the pretraining ends when it has used its share of the time left
after the encoding (``model.dense_pretrain_share``), or at its step count, whichever comes first, its learning
rate annealed to zero by whichever is further along; the chain keeps the rest. Without that bound a slower
machine, or a fourth training case, spent the whole 20-minute budget here and left the chain none of it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from sautomed.errors import UserError
from sautomed.models.sautomed.boxes import boxes_from_labels
from sautomed.models.sautomed.feature_cache import FeatureCache
from sautomed.models.sautomed.loss import dense_loss

log = logging.getLogger(__name__)

PRETRAIN_LR = 1e-3  # AdamW, cosine to zero over the pretraining steps
PRETRAIN_BATCH = 16  # slices per pretraining step
ENCODE_CHUNK = 8  # slices per encoder call while filling the cache


class DenseHead(nn.Module):
    """(f_prev, f_t, f_next) features (B, D, h, w) each -> (B, C+1, h, w) class logits."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3 * dim, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, num_classes + 1, 1),
        )

    def forward(self, f_prev: Tensor, f_t: Tensor, f_next: Tensor) -> Tensor:
        return self.layers(torch.cat([f_prev, f_t, f_next], dim=1))


@torch.no_grad()
def largest_component_2d(labels: Tensor, num_classes: int) -> Tensor:
    """(B, h, w) labels -> the same with each class cut to its largest 4-connected component per slice.

    Labels on an accelerator stay there (``largest_component_2d_torch``: no copy to the host and back on
    every chain step); on the CPU scipy's labelling is 4-5x faster than the tensor version (0.7 against
    3.7 ms for 2 slices of 64 x 64 with 4 classes, 2-core EPYC). Both keep the same pixels (a test says
    so)."""
    if labels.device.type != "cpu":
        return largest_component_2d_torch(labels, num_classes)
    arr = labels.numpy()
    out = np.zeros_like(arr)
    for b in range(arr.shape[0]):
        for c in range(1, num_classes + 1):
            comp, n = ndimage.label(arr[b] == c)
            if n:
                out[b][comp == 1 + int(np.bincount(comp.ravel())[1:].argmax())] = c
    return torch.from_numpy(out)


@torch.no_grad()
def largest_component_2d_torch(labels: Tensor, num_classes: int) -> Tensor:
    """largest_component_2d on the labels' own device, every slice and class at once: each pixel of a class
    starts with its own raster index as component id, takes the smallest id among its 4 neighbours of the
    same class, then the id its id points to (pointer jumping), until nothing changes; a component ends up
    with the raster index of its first pixel, as ``scipy.ndimage.label`` numbers them, so equal sizes
    resolve the same way (the first wins). No copy to the host, no Python loop over slices and classes."""
    B, h, w = labels.shape
    C, n = num_classes, h * w
    classes = torch.arange(1, C + 1, device=labels.device).view(1, C, 1, 1)
    fg = labels.unsqueeze(1) == classes  # (B, C, h, w)
    none = n  # larger than every raster index
    index = torch.arange(n, device=labels.device).view(1, 1, h, w)
    comp = torch.where(fg, index, none)
    while True:
        padded = F.pad(comp, (1, 1, 1, 1), value=none)
        left_right = torch.minimum(padded[..., 1:-1, :-2], padded[..., 1:-1, 2:])
        up_down = torch.minimum(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1])
        neighbours = torch.minimum(comp, torch.minimum(left_right, up_down))  # (a stack's amin is 50x slower)
        step = torch.where(fg, neighbours, none).flatten(2)  # (B, C, n)
        jumped = torch.gather(torch.cat([step, step.new_full((B, C, 1), none)], dim=2), 2, step)
        new = torch.minimum(step, jumped).view(B, C, h, w)
        if torch.equal(new, comp):
            break
        comp = new
    sizes = torch.zeros(B, C, n + 1, dtype=torch.long, device=labels.device)
    sizes.scatter_add_(2, comp.flatten(2), torch.ones_like(comp.flatten(2)))
    best = sizes[..., :n].argmax(dim=2)  # (B, C): the id of the largest component (the first on ties)
    keep = fg & (comp == best.view(B, C, 1, 1))
    return (keep * classes).sum(dim=1).to(labels.dtype)


@torch.no_grad()
def dense_boxes(logits: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(B, C+1, h, w) dense logits -> boxes (B, C, 4) cxcywh in [0, 1] of each class's largest component
    of the argmax, and (B, C) bool: the class holds a pixel of the argmax."""
    labels = largest_component_2d(logits.argmax(dim=1), num_classes)
    return boxes_from_labels(labels, num_classes)


def dense_presence(logits: Tensor) -> Tensor:
    """(B, C+1, h, w) dense logits -> (B, C) log-odds of each class's most confident position."""
    p = logits.float().softmax(dim=1)[:, 1:].amax(dim=(2, 3)).clamp(1e-6, 1 - 1e-6)  # (B, C)
    return (torch.log(p) - torch.log1p(-p)).to(logits.dtype)


def gate_class_logits(logits: Tensor, presence: Tensor, proposals: Tensor | None, mode: str) -> Tensor:
    """Class c's logits (B, C+1, H, W) shifted by log sigmoid of its presence logit (B, C): p(c at a pixel)
    ~ p(c in the slice) * p(pixel | its box). ``hard``: a class whose presence logit is below 0 cannot win a
    pixel of the slice; ``region``: nor a pixel farther than one feature cell from the proposals' own
    pixels of that class (``proposals`` (B, C+1, h, w)). The chain hands each organ's box on to the next slice
    and SAM segments whatever box it is given, so without them it carries an organ past its end or onto a
    neighbour (docs/method.md)."""
    cls = logits[:, 1:] + F.logsigmoid(presence.to(logits.dtype))[:, :, None, None]
    if mode in ("hard", "region"):
        cls = cls.masked_fill((presence < 0)[:, :, None, None], -1e4)
    if mode == "region" and proposals is not None:
        own = F.one_hot(proposals.argmax(1), proposals.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
        near = F.interpolate(F.max_pool2d(own, 3, 1, 1), size=cls.shape[-2:], mode="nearest") > 0
        cls = cls.masked_fill(~near, -1e4)
    return torch.cat([logits[:, :1], cls], dim=1)


@torch.no_grad()
def dense_volume_logits(head: DenseHead | None, feats: Tensor) -> Tensor:
    """(Z, D, h, w) encoded volume -> (Z, C+1, h, w) dense logits (volume edges repeat the edge slice)."""
    if head is None:  # predict --source dense on a checkpoint trained without the head
        raise UserError("inference.source: dense needs a checkpoint trained with network.dense_head")
    prev = torch.cat([feats[:1], feats[:-1]])
    nxt = torch.cat([feats[1:], feats[-1:]])
    return head(prev, feats, nxt)


def _rows(cache: FeatureCache | dict[int, Tensor], order: list[int], index: Tensor, device: Any) -> Tensor:
    """(B, D, h, w) float32 features of the slices at positions ``index`` of ``order``, from the cache."""
    return torch.stack([cache[order[j]] for j in index.tolist()]).to(device, torch.float32)


def pretrain_dense_head(
    net: nn.Module,
    copies: list[list[tuple[np.ndarray, np.ndarray]]],
    key_offset: list[list[int]],
    cache: FeatureCache | dict[int, Tensor],
    steps: int,
    seed: int,
    seconds_left: Callable[[], float | None] | None = None,
    share: float = 1.0,
    check: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Fill the chain's feature cache with every slice of every augmented copy, then train the dense head.

    copies / key_offset: the training data's fixed augmented copies ([volume][copy] -> (image, label)) and
    the slice_key of each copy's first slice (``WindowDataset``). The cache maps slice_key -> float16
    features, as ``window.encode_window_cached`` keeps them. ``seconds_left``: the run's time budget left
    (``Schedule.seconds_left``; None: no clock); the training then stops after ``share`` of what is left once
    the cache is full, or at ``steps``. Returns the loss of every step taken (the same steps and losses for
    a seed when no clock bounds them). ``check(encoded, total)`` is called after each encoded chunk: it
    raises to stop the run (a preemption, a budget the encoding cannot fit).
    """
    head: DenseHead = net.dense_head
    device = next(head.parameters()).device
    started = time.monotonic()
    order: list[int] = []  # slice keys in training order (their features stay in the cache: memory-mapped)
    labels: list[Tensor] = []
    neighbour: list[tuple[int, int]] = []  # per slice: its position in `order` minus one, plus one
    total = sum(image.shape[0] for vol in copies for image, _ in vol)
    encoded = 0
    for vol_copies, offsets in zip(copies, key_offset, strict=True):
        for (image, label), first in zip(vol_copies, offsets, strict=True):
            z = image.shape[0]
            for start in range(0, z, ENCODE_CHUNK):
                keys = [first + k for k in range(start, min(z, start + ENCODE_CHUNK))]
                if any(k not in cache for k in keys):
                    x = torch.from_numpy(np.ascontiguousarray(image[start : start + len(keys)])).to(device)
                    with torch.no_grad():
                        for k, f in zip(keys, net.encode(x.float())):
                            cache[k] = f.to(torch.float16).clone()
                encoded += len(keys)
                if check is not None:
                    check(encoded, total)
            base = len(order)
            order.extend(first + k for k in range(z))
            labels.extend(torch.from_numpy(label[k].astype(np.int64)) for k in range(z))
            neighbour.extend((base + max(k - 1, 0), base + min(k + 1, z - 1)) for k in range(z))
    if not order or steps <= 0:
        return []
    encoded_s, left = time.monotonic() - started, seconds_left() if seconds_left is not None else None
    budget = None if left is None else share * max(0.0, left)
    if left is not None and left < encoded_s:
        log.warning(
            "encoding the %d cached slices took %.0f s; %.0f s of the time budget are left for the dense "
            "head and the chain: fewer data.windows.augmented_copies or a longer trainer.max_time",
            len(order),
            encoded_s,
            left,
        )
    grid = cache[order[0]].shape[-2:]
    small = torch.stack(labels)[:, None].float()
    small = F.interpolate(small, size=grid, mode="nearest")[:, 0].long().to(device)  # (N, h, w)
    prev_i = torch.tensor([p for p, _ in neighbour])
    next_i = torch.tensor([n for _, n in neighbour])
    opt = torch.optim.AdamW(head.parameters(), lr=PRETRAIN_LR, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    head.train()
    training_from = time.monotonic()
    for step in range(steps):
        done = step / steps
        if budget is not None:
            done = max(done, (time.monotonic() - training_from) / budget if budget > 0 else 1.0)
            if done >= 1.0:
                break
        for group in opt.param_groups:
            group["lr"] = PRETRAIN_LR * 0.5 * (1 + math.cos(math.pi * done))
        idx = torch.randint(len(order), (min(PRETRAIN_BATCH, len(order)),), generator=gen)
        f = [_rows(cache, order, i, device) for i in (prev_i[idx], idx, next_i[idx])]
        loss = dense_loss(head(*f), small[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step and step % max(1, steps // 10) == 0:  # about every tenth of the steps (or of the clock)
            spent = time.monotonic() - training_from
            left = spent / max(done, 1e-6) - spent if done > 0 else 0.0
            log.info("dense head: step %d of %d, loss %.3f, about %.0f s left", step, steps, losses[-1], left)
    if not losses:
        log.warning("dense head not pretrained: no time left in the budget after encoding")
        return losses
    log.info(
        "dense head pretrained: %d of %d steps in %.0f s (%s) on %d cached slices (encoded in %.0f s), "
        "loss %.3f -> %.3f",
        len(losses),
        steps,
        time.monotonic() - training_from,
        "no clock" if budget is None else f"its share of the clock: {budget:.0f} s",
        len(order),
        encoded_s,
        losses[0],
        losses[-1],
    )
    return losses
