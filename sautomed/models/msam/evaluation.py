"""M-SAM's oracle-prompted evaluation and the metrics rows and summary keys it adds beside the automatic ones.

Per case (validation / test), two modes (``MODES``):

* **oracle-prompted** (the paper's protocol, needs the ground truth): :func:`oracle_dsc` takes one S^3 crop
  centred on the lesion's bounding box and clicks from the error region; the DSC inside the crop after each
  click. :func:`oracle_results` turns the cases' DSCs into the means after ``oracle_clicks`` clicks
  (``oracle_dsc@k``, and ``oracle_prompted`` in ``summary.json``) and one ``metrics.csv`` row per case and
  click count (class :func:`oracle_class_name`, status ``oracle_prompted``, no HD95);
* **automatic** (what ``predict`` does): the whole volume, scored with the shared metrics
  (``sautomed.evaluation.metrics``); the module collects those rows.

:func:`gather_oracle` brings every rank's oracle DSCs together, each case once; in validate / test the shared
evaluation (``sautomed.evaluation.base``) writes both to the run folder: ``metrics.csv`` holds the automatic
rows (class ``lesion``) and the oracle-prompted rows; ``summary.json`` holds the automatic means under the
shared keys (``mean_dsc``, ``per_class``, ...) and the oracle-prompted means under ``oracle_prompted`` (and as
``oracle_dsc@k``), with ``modes`` saying which is which, beside the checkpoint, the split provenance and
the config.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sautomed.evaluation.gather import gather_lists, unique_by
from sautomed.evaluation.metrics import ClassResult, dice
from sautomed.models.msam.clicks import ClickMode
from sautomed.models.msam.consistency import Consistency
from sautomed.models.msam.network import MSAMNet
from sautomed.models.msam.patches import crop_or_pad, crop_start
from sautomed.models.msam.refinement import MergeMode, refine_with_clicks

log = logging.getLogger(__name__)

CLASS_NAMES = ("lesion",)
MODES = {
    "automatic": "whole volume, no ground truth used (what predict does): mean_dsc, mean_hd95_mm, per_class "
    "and the metrics.csv rows of class 'lesion'",
    "oracle_prompted": "a crop centred on the reference lesion, clicks from the reference error region (the "
    "paper's protocol, needs the ground truth): oracle_prompted, oracle_dsc@k and the metrics.csv rows of "
    "class 'lesion (oracle-prompted, k clicks)'",
}

OracleCase = tuple[str, list[float]]  # (case, DSC after 1, 2, ... clicks)


def oracle_class_name(clicks: int) -> str:
    """The metrics.csv class of an oracle-prompted DSC after ``clicks`` clicks."""
    return f"{CLASS_NAMES[0]} (oracle-prompted, {clicks} click{'' if clicks == 1 else 's'})"


@dataclass(frozen=True)
class EvaluationSettings:
    """What validation / test report.

    Attributes:
        oracle_clicks: click counts at which the oracle-prompted DSC is reported.
        oracle: run the oracle-prompted evaluation.
        automatic: run the automatic whole-volume evaluation.
        merge: progressive merge of each click's change (``merge.py``, our addition): ``true`` the changed
            component holding the click, ``near`` every changed component within S/8 of it (as a user's
            clicks in ``predict --clicks``); ``false``: the network's prediction after each click as it is.
        click_seeds: oracle-prompted runs per case, each with its own clicks (seeds ``refinement.seed``,
            ``+ 1``, ...); a case's DSC after k clicks is their mean (random clicks vary from run to run).
        consistency_steps: at most this many gradient steps per click that make the answer agree with every
            click so far (``consistency.py``, our addition; 0: off).
        click_mode: the oracle's clicks, ``random`` error voxel (the paper's) or ``center`` of the largest
            error (RITM's protocol, a user's click); None: ``refinement.click_mode``, the training's.
    """

    oracle_clicks: tuple[int, ...] = (1, 3, 5, 10)
    oracle: bool = True
    automatic: bool = True
    merge: MergeMode = False
    click_seeds: int = 1
    consistency_steps: int = 0
    click_mode: ClickMode | None = None


def reference_on_image_grid(ref: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The (Z, Y, X) reference on the image's (in-plane resized) (Z, S, S) grid, as a bool mask."""
    if ref.shape != tuple(shape):
        t = torch.from_numpy(ref)[None, None].float()  # (1, 1, Z, Y, X)
        ref = F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy() > 0  # (Z, S, S)
    return ref.astype(bool)


@torch.no_grad()
def oracle_dsc(
    net: MSAMNet,
    image: Tensor,
    target: np.ndarray,
    case_id: str,
    clicks: int,
    image_size: int,
    seed: int = 0,
    accumulate_clicks: bool = False,
    click_mode: ClickMode = "random",
    merge: MergeMode = False,
    consistency: Consistency | None = None,
) -> list[float]:
    """Oracle-prompted DSC after each of ``clicks`` clicks, in an ``image_size``^3 crop centred on the lesion.

    ``image`` (C, Z, S, S) (C input channels) and the bool ``target`` (Z, S, S) share a grid; the clicks'
    seed is the case's CRC32 combined with ``seed``, so a case gets the same clicks in every evaluation.
    """
    s = image_size
    where = np.argwhere(target)
    centre = (where.min(0) + where.max(0)) // 2
    start = crop_start(centre, target.shape, s)
    img = torch.from_numpy(crop_or_pad(image.float().cpu().numpy(), start, s)).to(image.device)  # (C, S^3)
    tgt = crop_or_pad(target, start, s)
    gen = torch.Generator().manual_seed(zlib.crc32(case_id.encode()) ^ seed)
    res = refine_with_clicks(
        net,
        img[None],  # (1, C, S, S, S)
        torch.from_numpy(tgt.astype(np.float32))[None, None].to(image.device),
        clicks,
        gen,
        accumulate_clicks=accumulate_clicks,
        click_mode=click_mode,
        merge=merge,
        consistency=consistency,
    )
    return [dice((out[0, 0] > 0).cpu().numpy(), tgt) for out in res.logits]


def oracle_results(
    oracle: list[OracleCase], oracle_clicks: tuple[int, ...], click_mode: ClickMode
) -> tuple[dict[str, float], list[ClassResult], dict[str, Any]]:
    """The cases' oracle-prompted DSCs -> (mean by click count, metrics.csv rows, summary.json keys).

    No cases: nothing (empty means, rows and keys).
    """
    means: dict[str, float] = {}
    rows: list[ClassResult] = []
    summary: dict[str, Any] = {}
    if not oracle:
        return means, rows, summary
    for k in oracle_clicks:
        value = float(np.mean([dscs[k - 1] for _, dscs in oracle]))
        means[str(k)] = value
        summary[f"oracle_dsc@{k}"] = value
        name = oracle_class_name(k)
        rows += [ClassResult(case, name, dscs[k - 1], math.nan, "oracle_prompted") for case, dscs in oracle]
    summary["oracle_prompted"] = {
        "dsc_after_clicks": means,
        "num_cases": len(oracle),
        "click_mode": click_mode,
    }
    return means, rows, summary


def gather_oracle(oracle: list[OracleCase]) -> list[OracleCase]:
    """Every rank's oracle-prompted cases (the data module shards the volumes), each case once, by case."""
    (oracle,) = gather_lists(oracle)
    return unique_by(oracle, lambda o: o[0])


def summary_line(prefix: str, summary: dict[str, Any], folder: str | Path) -> str:
    """The one-line report of an M-SAM evaluation: automatic and oracle-prompted DSC."""
    means = summary.get("oracle_prompted", {}).get("dsc_after_clicks", {})
    oracle = ", ".join(f"{v:.4f} after {k}" for k, v in means.items()) or "-"
    return (
        f"{prefix}: automatic mean DSC {summary['mean_dsc']:.4f} over {summary['num_cases']} cases; "
        f"oracle-prompted DSC {oracle} clicks -> {folder}"
    )
