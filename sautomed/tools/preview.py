"""A PNG preview of a label map over its image: axial slices through the labelled extent, one coronal and
one sagittal plane, labels as semi-transparent fills with outlines, and a legend of class names and colours.

Views are in the patient's orientation (radiological convention) and physical aspect ratio, from canonical
(z, y, x) arrays (x towards the patient's left, y posterior, z superior; :mod:`sautomed.data.io`):

| view     | rows (top -> bottom)      | columns (left -> right) | pixel size |
|----------|---------------------------|-------------------------|------------|
| axial    | anterior -> posterior (y) | right -> left (x)       | dy x dx    |
| coronal  | superior -> inferior (z)  | right -> left (x)       | dz x dx    |
| sagittal | superior -> inferior (z)  | anterior -> posterior   | dz x dy    |

Every view is drawn at one scale (mm per pixel), so anisotropic voxels keep their physical proportions.
Colours come from :data:`sautomed.tools.labels.COLOURS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sautomed.data.io import Geometry, atomic_write
from sautomed.errors import UserError
from sautomed.evaluation.drawing import colour, grey, overlay
from sautomed.evaluation.drawing import font as _font

PAD = 6
CAPTION = 16  # pixels above each view for its caption


@dataclass(frozen=True)
class View:
    name: str  # caption
    rgb: np.ndarray  # (H, W, 3) uint8, physical aspect, labels drawn
    edges: tuple[str, str, str, str]  # orientation letters: top, bottom, left, right


def _plane(
    grey_plane: np.ndarray, label_plane: np.ndarray, row_mm: float, col_mm: float, mm_per_px: float
) -> np.ndarray:
    rows, cols = grey_plane.shape
    size = (max(1, round(cols * col_mm / mm_per_px)), max(1, round(rows * row_mm / mm_per_px)))
    g = np.asarray(Image.fromarray(grey_plane).resize(size, Image.Resampling.BILINEAR))
    lab = np.asarray(Image.fromarray(label_plane.astype(np.int32)).resize(size, Image.Resampling.NEAREST))
    return overlay(g, lab)


def axial_slices(labels: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` canonical z indices spread evenly over the labelled extent (whole volume if empty)."""
    present = np.nonzero(labels.reshape(labels.shape[0], -1).any(axis=1))[0]
    low, high = (int(present[0]), int(present[-1])) if present.size else (0, labels.shape[0] - 1)
    picks = np.round(np.linspace(low, high, min(count, high - low + 1))).astype(int)
    return sorted({int(z) for z in picks}, reverse=True)  # superior first


def views(
    image: np.ndarray,
    labels: np.ndarray,
    geom: Geometry,
    window: tuple[float, float] | None = None,
    axial: int = 8,
    tile: int = 256,
) -> list[View]:
    """The preview's views of canonical ``image`` and ``labels`` (same grid), ``tile`` px across an axial."""
    if image.shape != labels.shape or image.shape != geom.shape_zyx:
        raise UserError(f"{geom.path}: image {image.shape}, labels {labels.shape}, grid {geom.shape_zyx}")
    nz, ny, nx = labels.shape
    dz, dy, dx = geom.spacing_zyx
    mm_per_px = max(nx * dx, ny * dy) / tile
    g = grey(image, window)
    stored_axis, flipped = geom.axes[0], geom.flips[0]
    out = []
    for z in axial_slices(labels, axial):
        number = nz - 1 - z if flipped else z  # index along the file's own slice axis
        name = f"axial {number}" if stored_axis == 0 else f"axial (canonical {z})"
        out.append(View(name, _plane(g[z], labels[z], dy, dx, mm_per_px), ("A", "P", "R", "L")))
    fg = np.argwhere(labels > 0)
    cz, cy, cx = (int(v) for v in (fg.mean(axis=0).round() if fg.size else (nz // 2, ny // 2, nx // 2)))
    out.append(
        View("coronal", _plane(g[::-1, cy, :], labels[::-1, cy, :], dz, dx, mm_per_px), ("S", "I", "R", "L"))
    )
    out.append(
        View("sagittal", _plane(g[::-1, :, cx], labels[::-1, :, cx], dz, dy, mm_per_px), ("S", "I", "A", "P"))
    )
    return out


def _paste(canvas: Image.Image, draw: ImageDraw.ImageDraw, view: View, x: int, y: int) -> None:
    font = _font(12)
    draw.text((x, y + 1), view.name, fill=(220, 220, 220), font=font)
    y += CAPTION
    canvas.paste(Image.fromarray(view.rgb), (x, y))
    h, w = view.rgb.shape[:2]
    top, bottom, left, right = view.edges
    mark = (255, 255, 0)
    draw.text((x + w // 2, y + 2), top, fill=mark, font=font, anchor="mt")
    draw.text((x + w // 2, y + h - 2), bottom, fill=mark, font=font, anchor="mb")
    draw.text((x + 3, y + h // 2), left, fill=mark, font=font, anchor="lm")
    draw.text((x + w - 3, y + h // 2), right, fill=mark, font=font, anchor="rm")


def compose(
    all_views: Sequence[View],
    class_names: Mapping[int, str],
    present: set[int],
    columns: int = 4,
    title: str = "",
) -> Image.Image:
    """Axial views in a grid of ``columns``, then the coronal and sagittal views, then the legend."""
    axial = [v for v in all_views if v.name.startswith("axial")]
    others = [v for v in all_views if not v.name.startswith("axial")]
    columns = max(1, min(columns, len(axial)))
    cell_w = max(v.rgb.shape[1] for v in axial) + PAD
    cell_h = max(v.rgb.shape[0] for v in axial) + PAD + CAPTION
    grid_rows = math.ceil(len(axial) / columns)
    other_w = sum(v.rgb.shape[1] + PAD for v in others)
    other_h = max((v.rgb.shape[0] for v in others), default=0) + PAD + CAPTION
    legend_h = 20 * math.ceil(len(class_names) / 3) + PAD if class_names else 0
    width = max(columns * cell_w, other_w, 3 * 200) + PAD
    height = 20 + grid_rows * cell_h + other_h + legend_h + PAD
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 3), title, fill=(255, 255, 255), font=_font(13))
    for k, v in enumerate(axial):
        _paste(canvas, draw, v, PAD + (k % columns) * cell_w, 20 + (k // columns) * cell_h)
    x, y = PAD, 20 + grid_rows * cell_h
    for v in others:
        _paste(canvas, draw, v, x, y)
        x += v.rgb.shape[1] + PAD
    y += other_h
    for k, (value, name) in enumerate(sorted(class_names.items())):
        lx, ly = PAD + (k % 3) * 200, y + (k // 3) * 20
        draw.rectangle((lx, ly + 2, lx + 14, ly + 16), fill=colour(value), outline=(255, 255, 255))
        text = f"{value} {name}".strip() + ("" if value in present else " (absent)")
        draw.text(
            (lx + 20, ly + 2),
            text,
            fill=(230, 230, 230) if value in present else (120, 120, 120),
            font=_font(12),
        )
    return canvas


def write_preview(
    image: np.ndarray,
    labels: np.ndarray,
    geom: Geometry,
    class_names: Sequence[str] | Mapping[int, str],
    out: Path,
    window: tuple[float, float] | None = None,
    title: str = "",
) -> Path:
    """Render and write the preview PNG atomically; ``class_names`` are values 1..C or a value -> name map."""
    names = dict(class_names) if isinstance(class_names, Mapping) else dict(enumerate(class_names, start=1))
    present = {int(v) for v in np.unique(labels) if v > 0}
    unnamed = "(not in the label table)" if names else ""  # without a table, values alone
    names.update({v: unnamed for v in present if v not in names})
    picture = compose(views(image, labels, geom, window), names, present, title=title)
    return atomic_write(Path(out), lambda p: picture.save(p, format="PNG"))


def preview_main(argv: Sequence[str]) -> int:
    """`sautomed preview --image IMG --labels LAB --out PNG [--table JSON] [--window LOW HIGH]`."""
    import argparse

    from sautomed.data.io import read_label_volume, read_volume
    from sautomed.tools.labels import LABELS_FILE, read_label_names

    p = argparse.ArgumentParser(prog="sautomed preview", description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True, type=Path, help="image volume or DICOM series folder")
    p.add_argument("--labels", required=True, type=Path, help="label map on the image's grid")
    p.add_argument("--out", required=True, type=Path, help="PNG to write")
    p.add_argument(
        "--table", type=Path, default=None, help=f"class names (default: {LABELS_FILE} beside --labels)"
    )
    p.add_argument(
        "--window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help="e.g. CT -160 240"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    a = p.parse_args(argv)
    if a.out.exists() and not a.overwrite:
        raise FileExistsError(f"{a.out}: exists (pass --overwrite to replace it)")
    image, geom = read_volume(a.image)
    labels = read_label_volume(a.labels, reference=geom)
    table = a.table or (a.labels.parent / LABELS_FILE)
    names = read_label_names(table) if a.table or table.is_file() else {}
    write_preview(
        image, labels, geom, names, a.out, tuple(a.window) if a.window else None, title=a.labels.name
    )
    print(f"wrote {a.out}")
    return 0
