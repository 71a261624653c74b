"""Box helpers: boxes of label maps, format conversion, generalised IoU.

Boxes are (cx, cy, w, h) normalised to [0, 1] with the pixel-edge convention: a class occupying columns
xmin..xmax of a W-wide map spans x0 = xmin / W to x1 = (xmax + 1) / W.
"""

from __future__ import annotations

import torch
from torch import Tensor


def boxes_from_labels(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Bounding boxes of classes 1..C in label maps.

    Args:
        labels: (B, H, W) integer labels in 0..C (0 = background).
        num_classes: C, the number of foreground classes.

    Returns:
        boxes (B, C, 4) float cxcywh in [0, 1] (zeros for absent classes), present (B, C) bool.
    """
    B, H, W = labels.shape
    classes = torch.arange(1, num_classes + 1, device=labels.device)
    masks = labels.unsqueeze(1) == classes.view(1, -1, 1, 1)  # (B, C, H, W)
    rows = masks.any(dim=3)  # (B, C, H)
    cols = masks.any(dim=2)  # (B, C, W)
    present = rows.any(dim=2)  # (B, C)
    # first / last occupied index via argmax over a 0/1 tensor (argmax returns the first maximum)
    y0 = rows.to(torch.uint8).argmax(dim=2)
    y1 = H - 1 - rows.flip(2).to(torch.uint8).argmax(dim=2)
    x0 = cols.to(torch.uint8).argmax(dim=2)
    x1 = W - 1 - cols.flip(2).to(torch.uint8).argmax(dim=2)
    fx0, fx1 = x0.float() / W, (x1.float() + 1) / W
    fy0, fy1 = y0.float() / H, (y1.float() + 1) / H
    boxes = torch.stack([(fx0 + fx1) / 2, (fy0 + fy1) / 2, fx1 - fx0, fy1 - fy0], dim=-1)  # (B, C, 4)
    boxes = boxes * present.unsqueeze(-1)
    return boxes, present


def box_cxcywh_to_xyxy(b: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) x0y0x1y1."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(b: Tensor) -> Tensor:
    """(..., 4) x0y0x1y1 -> (..., 4) cxcywh."""
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def generalized_box_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Elementwise generalised IoU of xyxy boxes of the same shape (..., 4) -> (...), in [-1, 1]."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / (union + eps)
    lt_c = torch.minimum(a[..., :2], b[..., :2])
    rb_c = torch.maximum(a[..., 2:], b[..., 2:])
    wh_c = (rb_c - lt_c).clamp(min=0)
    area_c = wh_c[..., 0] * wh_c[..., 1]
    return iou - (area_c - union) / (area_c + eps)
