"""A short CPU run of the tiny M-SAM on lesion phantoms: oracle DSC after 1, 3, 5, 10 clicks, and automatic.

    python -m sautomed.models.msam.cpu_demo --out /tmp/msam_demo --steps 200

Makes lesion phantoms (``sautomed.data.lesion_phantom``), trains the tiny network on 32^3 lesion crops with
simulated clicks, then validates on the held-out fold: oracle-prompted DSC after k clicks (crop and clicks
from the ground truth, the paper's protocol) and the automatic whole-volume DSC (sliding windows,
prompt-free pass, self-prompting).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from sautomed.data.lesion_phantom import make_lesion_phantoms
from sautomed.data.preprocess import Preprocessing
from sautomed.models.msam.automatic import AutoSettings
from sautomed.models.msam.evaluation import EvaluationSettings
from sautomed.models.msam.module import MSAMModule, RefinementSettings
from sautomed.models.msam.network import MSAMConfig
from sautomed.models.msam.patches import CropSettings, MSAMDataModule


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", type=int, default=15)
    ap.add_argument("--size", type=int, default=48, help="phantom edge (voxels)")
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument(
        "--mimics", type=int, default=0, help="up to this many unlabelled lesion-like blobs per case"
    )
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--iterations", type=int, default=6, help="refinement iterations per training crop")
    ap.add_argument("--fusion", default="mea", choices=["mea", "sum", "cross_attention"])
    ap.add_argument("--accumulate-clicks", action="store_true", help="give every click so far each iteration")
    ap.add_argument("--folds", type=int, default=3, help="cross-validation folds (fold 0 is validated)")
    ap.add_argument("--click-mode", default="random", choices=["random", "center"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rel-pos", default="sam_med3d", choices=["sam_med3d", "decomposed"])
    ap.add_argument("--pe-order", default="sam_med3d", choices=["sam_med3d", "consistent"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    data = args.out / "lesions"
    if not (data / "dataset.json").is_file():
        make_lesion_phantoms(data, args.cases, seed=args.seed, size=(args.size,) * 3, mimics=args.mimics)
    dm = MSAMDataModule(
        crops=CropSettings(size=args.crop, samples_per_epoch=args.steps * 2),
        layout="nnunet",
        root=str(data),
        folds=args.folds,
        preprocessing=Preprocessing(image_size=args.size, normalization="percentile"),
        batch_size=2,
        cache_dir=str(args.out / "cache"),
        seed=args.seed,
    )
    module = MSAMModule(
        network=MSAMConfig(
            variant="tiny",
            image_size=args.crop,
            fusion=args.fusion,
            rel_pos_indexing=args.rel_pos,
            dense_pe_order=args.pe_order,
        ),
        refinement=RefinementSettings(
            iterations=args.iterations,
            prompt_free_probability=0.3,
            accumulate_clicks=args.accumulate_clicks,
            click_mode=args.click_mode,
            seed=args.seed,
        ),
        evaluation=EvaluationSettings(oracle_clicks=(1, 3, 5, 10)),
        automatic=AutoSettings(),
        lr=args.lr,
        decoder_lr_scale=1.0,
        weight_decay=1e-4,
        scheduler="cosine",
    )
    trainer = L.Trainer(
        default_root_dir=str(args.out / "run"),
        accelerator="cpu",
        max_steps=args.steps,
        max_epochs=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    before = time.time()
    trainer.fit(module, datamodule=dm)
    train_s = time.time() - before
    trainer = L.Trainer(
        default_root_dir=str(args.out / "run"), accelerator="cpu", logger=False, enable_progress_bar=False
    )
    trainer.validate(module, datamodule=dm)
    result = {
        k: v for k, v in module.last_summary.items() if k != "config" and not isinstance(v, dict | list)
    }
    result.update(train_seconds=round(train_s, 1), **{k: str(v) for k, v in vars(args).items()})
    trainer.save_checkpoint(args.out / "msam_tiny.ckpt")
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
