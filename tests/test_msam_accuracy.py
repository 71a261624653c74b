"""The tiny M-SAM learns: a short CPU fit through the CLI on lesion phantoms, scored on held-out phantoms.

The other M-SAM tests check wiring with two optimiser steps, which a model that learns nothing passes. This
one fits the tiny network from random weights for a fixed number of steps (not a clock: a slower machine
runs the same fit) and asserts accuracy bars that a broken model, loss, click sampler or schedule fails.

Why short fits used to learn nothing (models/msam/README.md, "Why a short fit on phantoms learned
nothing"): the public code's ``decoder_lr_scale`` 0.1 is for fine-tuning a pretrained SAM-Med3D decoder; from
random weights it leaves the prompt encoder and mask decoder at lr x 0.1 (200 steps: oracle DSC 0.14,
automatic 0.0). With 1.0 (as ``configs/msam_brats.yaml``) and enough training cases (12, not 2-4 with small
lesions) the same budget learns.

Seen (250 steps; data seeds 0 / 1 / 2): oracle DSC after 1 click 0.67 / 0.69 / 0.74, after 10 clicks
0.68 / 0.70 / 0.73, automatic 0.72 / 0.65 / 0.73; the test uses seed 0. 57-74 s alone on 2 CPU cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from scipy import ndimage

from sautomed.cli import main
from sautomed.data.io import from_canonical
from sautomed.data.lesion_phantom import make_lesion_phantoms
from sautomed.families import module_from_checkpoint
from sautomed.models.msam.automatic import interior_point
from sautomed.models.msam.session import Click, ClickSession
from sautomed.run_folder import read_checkpoint

CLICKS = (1, 3, 5, 10)
STEPS = 250
# bars about 0.1 below the lowest figures seen over three data seeds; a model that learned nothing scores ~0
BAR_ORACLE_1 = 0.55
BAR_ORACLE_10 = 0.55
BAR_AUTOMATIC = 0.55


def accuracy_config(path: Path, data: Path, run_dir: Path, steps: int = STEPS) -> Path:
    """The tiny M-SAM (32^3 crops) from random weights on 48^3 lesion phantoms, ``steps`` optimiser steps."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(run_dir),
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": steps,
            "max_epochs": 1,  # one epoch of 2 x steps crops (batch 2): max_steps ends it
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,  # folds 1: every training case trains; the held-out ones are test_root
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 10,
        },
        "model": {
            "class_path": "sautomed.models.msam.module.MSAMModule",
            "init_args": {
                "network": {"variant": "tiny", "image_size": 32},
                "refinement": {"iterations": 3, "prompt_free_probability": 0.5},
                "evaluation": {"oracle_clicks": list(CLICKS)},
                "automatic": {"self_prompt_iterations": 1, "min_component_voxels": 5},
                "lr": 1e-3,
                "decoder_lr_scale": 1.0,  # random weights: no pretrained decoder to keep close to
                "weight_decay": 1e-4,
                "scheduler": "cosine",
            },
        },
        "data": {
            "layout": "nnunet",
            "root": str(data / "train"),
            "test_root": str(data / "test"),
            "folds": 1,
            "preprocessing": {"image_size": 48, "normalization": "percentile"},
            "crops": {"size": 32, "samples_per_epoch": 2 * steps},
            "batch_size": 2,
            "cache_dir": str(data / "cache"),
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit_and_test(base: Path, data_seed: int = 0, steps: int = STEPS) -> tuple[dict, float]:
    """12 training and 4 held-out phantoms of 48^3 in ``base``; fit, then test last.ckpt.

    Returns (summary.json, fit seconds)."""
    data = base / "lesions"
    make_lesion_phantoms(data / "train", 12, seed=data_seed, size=(48, 48, 48))
    make_lesion_phantoms(data / "test", 4, seed=data_seed + 1000, size=(48, 48, 48))
    cfg = accuracy_config(base / "msam.yaml", data, base / "run", steps)
    start = time.perf_counter()
    assert main(["fit", "--config", str(cfg)]) == 0
    fit_s = time.perf_counter() - start
    assert main(["test", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    return json.loads((base / "run" / "summary.json").read_text()), fit_s


@pytest.fixture(scope="module")
def lesion_msam(tmp_path_factory) -> tuple[dict, Path]:
    """(summary.json of the test, the folder holding lesions/ and run/) of the 250-step fit."""
    base = tmp_path_factory.mktemp("accuracy")
    summary, _ = fit_and_test(base)
    return summary, base


pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*could not find the monitored key")]


def test_the_tiny_msam_learns_lesion_phantoms(lesion_msam):
    summary, _ = lesion_msam
    oracle = summary["oracle_prompted"]
    assert oracle["num_cases"] == 4 and summary["num_cases"] == 4 and summary["overlaps_training"] == []
    dsc = {int(k): v for k, v in oracle["dsc_after_clicks"].items()}
    assert dsc[1] >= BAR_ORACLE_1, dsc
    assert dsc[10] >= BAR_ORACLE_10, dsc
    assert dsc[10] >= dsc[1] - 0.1, dsc  # further clicks do not undo the first one's mask
    assert summary["mean_dsc"] >= BAR_AUTOMATIC, summary["mean_dsc"]  # the automatic mode (predict's)


def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_a_users_clicks_on_unseen_phantoms_add_and_remove_where_they_land(lesion_msam):
    """The trained tiny M-SAM through ClickSession on the 4 held-out phantoms (what predict --clicks runs):
    one positive click inside the lesion of an empty mask segments it; a positive click inside the largest
    region the automatic mask missed adds lesion there; a negative click inside its largest false positive
    removes a good part of it. The trained network, and so these figures, differ with the data seed and
    with torch's thread count (its sums' order); six networks seen (2026-12-07, data seeds 0 / 1 / 2, 1 and
    2 threads, 24 cases): DSC 0.51-0.86 after the one click (each network's mean >= 0.67); 10-479 missed
    voxels added (>= 10 on every case); 15-88% of the false positive removed (>= 33% on 3 or 4 of each
    network's 4 cases; seed 0 at 2 threads, the weakest: 46, 66, 15 and 34%). The tiny network is weak:
    the bars say what every one of those networks did on most cases; a click that did nothing adds and
    removes 0."""
    _, base = lesion_msam
    module = module_from_checkpoint(read_checkpoint(base / "run" / "last.ckpt"))
    one_click, added, removed = [], [], []
    for image in sorted((base / "lesions" / "test" / "imagesTr").glob("*_0000.nii.gz")):
        label = base / "lesions" / "test" / "labelsTr" / image.name.replace("_0000", "")
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(label))) > 0  # stored (k, j, i)
        empty = ClickSession.for_volume(module, image, "empty")
        k, j, i = interior_point(ref)
        mask = from_canonical(empty.click(Click((i, j, k))), empty.geom) > 0
        assert mask[k, j, i]
        one_click.append(_dsc(mask, ref))

        session = ClickSession.for_volume(module, image, "automatic")
        auto = from_canonical(session.labels(), session.geom) > 0
        for region, positive, out in ((ref & ~auto, True, added), (auto & ~ref, False, removed)):
            labels, n = ndimage.label(region)
            biggest = labels == 1 + int(np.bincount(labels.ravel())[1:].argmax())
            k, j, i = interior_point(biggest)
            session = ClickSession.for_volume(module, image, "automatic")
            after = from_canonical(session.click(Click((i, j, k), positive=positive)), session.geom) > 0
            out.append(
                int((after & biggest).sum())
                if positive
                else float((biggest & ~after).mean() / biggest.mean())
            )
    assert min(one_click) >= 0.25 and np.mean(one_click) >= 0.55, one_click
    assert sum(a >= 10 for a in added) >= 2, added
    assert sum(r >= 0.33 for r in removed) >= 2, removed
