"""Drawing primitives every picture of sautomed uses (previews, thumbnails, DICOM-SEG colours): one colour
per label value, intensities to grey, labels as semi-transparent fills with outlines."""

from __future__ import annotations

import numpy as np
from PIL import ImageFont

ALPHA = 0.4  # opacity of a label fill; outlines are opaque

# Distinct colours for label values 1, 2, ... (Sasha Trubetskoy's 20-colour list, most distinct first);
# value v > 20 takes colour (v - 1) % 20.
COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)


def colour(value: int) -> tuple[int, int, int]:
    """RGB colour of label value ``value`` (0, background, is black)."""
    if value <= 0:
        return (0, 0, 0)
    return COLOURS[(value - 1) % len(COLOURS)]


def font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def grey(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Intensities -> uint8 grey, clipped to ``window`` (a CT window), else to the 0.5-99.5 percentiles."""
    image = np.asarray(image, dtype=np.float32)
    low, high = window if window is not None else np.percentile(image, (0.5, 99.5))
    if not high > low:
        return np.zeros(image.shape, np.uint8)
    return np.round(np.clip((image - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def overlay(grey2d: np.ndarray, labels2d: np.ndarray) -> np.ndarray:
    """(H, W) uint8 grey + (H, W) labels -> (H, W, 3) uint8 with fills and outlines."""
    rgb = np.repeat(grey2d[..., None].astype(np.float32), 3, axis=2)
    for value in np.unique(labels2d):
        if value <= 0:
            continue
        mask = labels2d == value
        c = np.asarray(colour(int(value)), np.float32)
        rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * c
        rgb[_outline(mask)] = c
    return np.round(rgb).astype(np.uint8)
