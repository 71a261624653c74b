"""Per-case thumbnails for ``report.html``: reference and prediction side by side on one axial slice.

The slice is the one with the most reference foreground (the most predicted foreground when the reference is
empty). Written by every evaluation (``validate``, ``test``, ``sautomed evaluate``) as
``<folder>/thumbnails/<case>.png``; the report embeds them, so the page stays one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sautomed.data.io import atomic_write
from sautomed.errors import UserError
from sautomed.evaluation.drawing import font, grey, overlay

THUMBNAILS = "thumbnails"
TILE = 160  # pixels across each half


def thumbnail_slice(ref: np.ndarray, pred: np.ndarray) -> int:
    """The axial index (of (Z, H, W) label maps) with the most reference foreground, else prediction's."""
    area = (ref > 0).sum(axis=(1, 2))
    if not area.any():
        area = (pred > 0).sum(axis=(1, 2))
    return int(area.argmax())


def render_thumbnail(image: np.ndarray | None, ref: np.ndarray, pred: np.ndarray) -> Image.Image:
    """(Z, H, W) reference and prediction (and the image, any in-plane size, or None) -> one RGB picture."""
    if ref.shape != pred.shape:
        raise UserError(f"reference {ref.shape} and prediction {pred.shape} differ")
    z = thumbnail_slice(ref, pred)
    H, W = ref.shape[1:]
    if image is None:
        g = np.full((H, W), 40, np.uint8)
    else:
        g = grey(np.asarray(image)[z])
        if g.shape != (H, W):
            g = np.asarray(Image.fromarray(g).resize((W, H), Image.BILINEAR))
    scale = TILE / max(H, W)
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    halves = [Image.fromarray(overlay(g, lab[z])).resize(size, Image.NEAREST) for lab in (ref, pred)]
    canvas = Image.new("RGB", (2 * size[0] + 6, size[1] + 16), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (half, caption) in enumerate(zip(halves, ("reference", f"prediction (slice {z})"), strict=True)):
        canvas.paste(half, (k * (size[0] + 6), 16))
        draw.text((k * (size[0] + 6) + 2, 2), caption, fill=(220, 220, 220), font=font(11))
    return canvas


def write_thumbnail(
    folder: str | Path, case_id: str, image: np.ndarray | None, ref: np.ndarray, pred: np.ndarray
) -> Path:
    """Write ``folder/thumbnails/<case_id>.png`` atomically."""
    picture = render_thumbnail(image, ref, pred)
    out = Path(folder) / THUMBNAILS / f"{case_id}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda p: picture.save(p, format="PNG"))


def write_run_thumbnail(
    trainer: Any, case_id: str, image: Any, ref: np.ndarray, pred: np.ndarray
) -> Path | None:
    """In ``validate`` / ``test``: the thumbnail into the run folder (beside metrics.csv); else nothing."""
    if trainer is None or getattr(trainer.state, "fn", None) not in ("validate", "test"):
        return None
    if hasattr(image, "detach"):  # a tensor
        image = image.detach().float().cpu().numpy()
    return write_thumbnail(trainer.default_root_dir, case_id, image, ref, pred)
