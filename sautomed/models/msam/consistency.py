"""Clicks the answer must agree with: backpropagating refinement at inference (our addition to M-SAM).

A network trained from scratch on a few cases answers a click on an unseen image weakly: the clicked voxel
often keeps its wrong label (on a held-out BraTS case, the tiny M-SAM's DSC fell from 0.64 after one click
to 0.58 after ten; with the change near each click alone it stayed flat: the network changed nothing there).
Backpropagating refinement (BRS, Jang and Kim, CVPR 2019; f-BRS, Sofiiuk et al., CVPR 2020) makes every
click a constraint at inference: an additive correction ``delta`` of the previous low-res logits the decoder
reads is optimised, the network frozen, until the decoder's answer takes each click's label at the clicked
voxel::

    loss(delta) = mean_k softplus(-(2 y_k - 1) * logit(p_k) + margin) + weight * mean(delta^2)

``delta`` starts at zero and the optimisation stops as soon as every click agrees with margin, so a network
that already follows its clicks is left alone. The network's own weights decide how far the change spreads,
not a hand-drawn disk: with a local head (``network.local_head``) the correction goes through the head
alone (the decoder's answer computed once per click, as f-BRS optimises only a network's last layers for
speed), otherwise through the whole decoder. Training never uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sautomed.models.msam.network import MSAMNet


@dataclass(frozen=True)
class Consistency:
    """Settings of the click-consistent decoding.

    Attributes:
        steps: at most this many gradient steps per click (0: off).
        lr: Adam's step on the correction (logit units).
        margin: a click agrees once its logit has the click's sign by this much.
        weight: weight of the correction's mean square (keeps it small where no click asks for it).
    """

    steps: int = 0
    lr: float = 0.5
    margin: float = 1.0
    weight: float = 0.01


def click_logits(low: Tensor, points: Tensor, size: tuple[int, int, int]) -> Tensor:
    """(B, 1, l, l, l) low-res logits, (B, K, 3) voxel indices of the ``size`` grid -> (B, K) the logits
    ``net.upscale(low, size)`` has at the clicks, read by trilinear sampling at those points alone (the
    same half-voxel convention as ``F.interpolate(..., align_corners=False)``)."""
    scale = torch.tensor(size, dtype=low.dtype, device=low.device)
    norm = (points.to(low.dtype) + 0.5) / scale * 2 - 1  # (B, K, 3) in (d, h, w) order
    grid = norm.flip(-1)[:, :, None, None, :]  # grid_sample wants (x, y, z) = (w, h, d)
    return F.grid_sample(low, grid, mode="bilinear", padding_mode="border", align_corners=False)[
        :, 0, :, 0, 0
    ]


def consistent_decode(
    net: MSAMNet,
    embedding: Tensor,
    points: tuple[Tensor, Tensor] | None,
    prev_low_res: Tensor | None,
    clicks: tuple[Tensor, Tensor] | None,
    size: tuple[int, int, int],
    settings: Consistency,
) -> tuple[Tensor, Tensor]:
    """``net.decode`` whose answer agrees with every click so far (module doc).

    Args:
        net, embedding, points, prev_low_res, clicks: as ``MSAMNet.decode`` (``clicks``: every click so far,
            (B, K, 3) voxel indices of the S^3 crop and (B, K) labels; the constraints).
        size: the full-size grid (S, S, S) the clicks index.
        settings: the optimisation (``steps`` 0: one plain decode).

    Returns:
        the low-res logits (B, 1, 4g^3) and the previous logits the answer was decoded from (with the
        correction; the input's own, or zeros, when none was needed).
    """
    prev = prev_low_res
    if prev is None:
        prev = embedding.new_zeros(embedding.shape[0], 1, *net.low_res_size)
    if settings.steps <= 0 or clicks is None:
        return net.decode(embedding, points, prev, clicks), prev
    head = net.local_head
    if head is not None:  # the decoder's answer once; the correction goes through the local head alone
        base = net.decode(embedding, points, prev, clicks, local_head=False)
        maps = net.click_maps_of(clicks, prev)
        low = head(base, prev, maps)  # = net.decode(embedding, points, prev, clicks)
    else:
        low = net.decode(embedding, points, prev, clicks)
    where, labels = clicks
    sign = labels.to(low.dtype) * 2 - 1  # (B, K): +1 positive, -1 negative

    def violation(low: Tensor) -> Tensor:
        return settings.margin - sign * click_logits(low, where, size)

    if bool((violation(low) <= 0).all()):
        return low, prev
    # validation and test run under inference mode, whose tensors autograd cannot save: normal copies
    with torch.inference_mode(False), torch.enable_grad():
        prev, where, sign = prev.clone(), where.clone(), sign.clone()
        delta = torch.zeros_like(prev, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=settings.lr)
        if head is not None:
            base, maps = base.clone(), maps.clone()

            def decode(delta: Tensor) -> Tensor:
                return head(base, prev + delta, maps)
        else:
            embedding = embedding.clone()
            points = None if points is None else (points[0].clone(), points[1].clone())
            clicks = (clicks[0].clone(), clicks[1].clone())

            def decode(delta: Tensor) -> Tensor:
                return net.decode(embedding, points, prev + delta, clicks)

        for _ in range(settings.steps):
            low = decode(delta)
            v = violation(low)
            if bool((v <= 0).all()):
                break
            loss = F.softplus(v).mean() + settings.weight * delta.pow(2).mean()
            (grad,) = torch.autograd.grad(loss, delta)
            delta.grad = grad
            opt.step()
        else:
            low = decode(delta)
        corrected = (prev + delta).detach()
        return low.detach(), corrected
