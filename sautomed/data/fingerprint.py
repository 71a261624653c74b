"""A dataset's fingerprint (nnU-Net's word): what `sautomed plan` decides from, read once and cached.

Per case: its canonical (z, y, x) shape and spacing, the share of its voxels at its minimum intensity (the
constant background of a skull-stripped or masked scan), and its labels' voxel counts per class; over the
dataset: the foreground intensities' percentiles (channel 0, sampled: at most ``SAMPLES`` voxels a case),
each class's voxel count and the cases holding it, and the channel names. The fingerprint is cached as JSON
under ``~/.cache/sautomed/fingerprints`` (``$SAUTOMED_CACHE``), keyed by the dataset's files (names, sizes,
modification times), and written atomically; a changed file makes a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sautomed.data.io import atomic_write
from sautomed.data.layouts import Layout

SAMPLES = 10_000


@dataclass(frozen=True)
class Fingerprint:
    root: str
    case_ids: list[str]
    shapes_zyx: list[list[int]]
    spacings_zyx: list[list[float]]
    class_names: list[str]
    class_voxels: list[int]  # per class 1..C over all cases
    class_cases: list[int]  # cases holding each class
    foreground_percentiles: dict[str, float]  # of channel 0's intensities inside the labels: 0.5, 50, 99.5
    channel_names: list[str]
    background_fractions: list[float]  # per case: channel 0's voxels at its minimum value, a share

    @property
    def median_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in np.median(np.asarray(self.shapes_zyx), axis=0))

    @property
    def median_spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.median(np.asarray(self.spacings_zyx), axis=0))


def cache_folder() -> Path:
    root = os.environ.get("SAUTOMED_CACHE") or Path.home() / ".cache" / "sautomed"
    return Path(root) / "fingerprints"


def _key(layout: Layout, files: list[Path]) -> str:
    h = hashlib.sha256(f"{layout.name}|{layout.root.resolve()}|{layout.channels}".encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def fingerprint(layout: Layout, progress: Callable[[str], None] = print) -> Fingerprint:
    """The dataset's fingerprint, from the cache when its files have not changed."""
    cases = layout.cases()
    files = [p for c in cases for p in (c.image, c.label) if p is not None and p.is_file()]
    cached = cache_folder() / f"{_key(layout, files)}.json"
    if cached.is_file():
        try:
            found = Fingerprint(**json.loads(cached.read_text()))
            progress(f"fingerprint: {len(found.case_ids)} cases, from the cache ({cached})")
            return found
        except (OSError, ValueError, TypeError):
            pass  # an unreadable cache, or one of an older format, is rebuilt
    C = len(layout.class_names)
    shapes, spacings, samples, background = [], [], [], []
    voxels, holding = np.zeros(C, np.int64), np.zeros(C, np.int64)
    rng = np.random.default_rng(0)
    started = time.monotonic()
    for k, case in enumerate(cases, start=1):
        loaded = layout.load(case)
        image = loaded.image[0] if loaded.image.ndim == 4 else loaded.image
        shapes.append([int(v) for v in image.shape])
        spacings.append([float(v) for v in loaded.geom.spacing_zyx])
        background.append(float((image == image.min()).mean()) if image.size else 0.0)
        if loaded.label is not None:
            counts = np.bincount(loaded.label.ravel(), minlength=C + 1)[1 : C + 1]
            voxels += counts
            holding += counts > 0
            fg = image[loaded.label > 0]
            if fg.size:
                samples.append(rng.choice(fg, size=min(SAMPLES, fg.size), replace=False))
        left = (time.monotonic() - started) / k * (len(cases) - k)
        progress(f"fingerprint: case {k} of {len(cases)} ({case.case_id}), about {left:.0f} s left")
    values = np.concatenate(samples) if samples else np.zeros(1, np.float32)
    pct = {str(q): float(np.percentile(values, q)) for q in (0.5, 50, 99.5)}
    found = Fingerprint(
        root=str(layout.root),
        case_ids=[c.case_id for c in cases],
        shapes_zyx=shapes,
        spacings_zyx=spacings,
        class_names=list(layout.class_names),
        class_voxels=[int(v) for v in voxels],
        class_cases=[int(v) for v in holding],
        foreground_percentiles=pct,
        channel_names=list(_channel_names(layout)),
        background_fractions=background,
    )
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, lambda p: p.write_text(json.dumps(asdict(found), indent=1)))
    return found


def _channel_names(layout: Layout) -> tuple[str, ...]:
    if layout.name == "nnunet":
        from sautomed.data.layouts.nnunet import nnunet_channel_names

        return nnunet_channel_names(layout.root)
    return (layout.modality,) if layout.modality else ()
