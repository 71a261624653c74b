"""Optional post-processing of predicted label maps (plain numpy / scipy)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def keep_largest_component(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep the largest 3D connected component (26-connectivity) of each class; the rest -> background."""
    out = labels.copy()
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for c in range(1, num_classes + 1):
        mask = labels == c
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[(comp != 0) & (comp != int(sizes.argmax()))] = 0
    return out
