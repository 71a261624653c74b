"""The baselines through the CLI in-process: family selection, fit -> test -> predict, refused checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from sautomed.cli import main
from sautomed.families import DEFAULT, FAMILIES, family_for_args, module_from_checkpoint, requested_class_path
from sautomed.models.baselines.module import BaselineModule
from sautomed.models.baselines.network import UNetSettings, network_plan
from sautomed.models.sautomed.module import SAutoMedModule
from sautomed.models.sautomed.network import NetworkConfig
from sautomed.writers import output_name

CLASS_PATH = "sautomed.models.baselines.module.BaselineModule"
CLASSES = ["liver", "right_kidney", "left_kidney", "spleen", "aorta"]


def baseline_config(make_unet_config, base: Path, phantoms: Path, kind: str) -> Path:
    """The tiny U-Net config on the phantoms' `train` (2 folds) and `test` folders, run folder `base/run`."""
    return make_unet_config(
        base / "c.yaml", phantoms / "train", base / "run", kind, test_root=str(phantoms / "test"), folds=2
    )


@pytest.fixture(scope="module", params=["unet2d", "unet3d"])
def baseline_run(request, tiny_phantoms, make_unet_config, tmp_path_factory) -> tuple[str, Path, Path]:
    """(kind, config, run folder) of a one-epoch fit through the CLI."""
    base = tmp_path_factory.mktemp(request.param)
    cfg = baseline_config(make_unet_config, base, tiny_phantoms, request.param)
    assert main(["fit", "--config", str(cfg)]) == 0
    return request.param, cfg, base / "run"


@pytest.fixture(scope="module")
def sautomed_ckpt(tmp_path_factory) -> Path:
    """An (untrained) tiny 3D-SAutoMed checkpoint as the run folder would hold it."""
    module = SAutoMedModule(
        NetworkConfig(backbone="tiny", image_size=64, num_classes=5, encoder_finetune="full")
    )
    module.class_names = tuple(CLASSES)
    module.preprocessing = {"image_size": 64, "normalization": "ct"}
    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0}
    ckpt["pytorch-lightning_version"] = lightning.__version__
    module.on_save_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("sautomed") / "sautomed.ckpt"
    torch.save(ckpt, path)
    return path


def test_family_comes_from_the_config_class_path(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"model": {"lr": 1e-3}}))
    named = tmp_path / "named.yaml"
    named.write_text(yaml.safe_dump({"model": {"class_path": CLASS_PATH, "init_args": {}}}))
    assert family_for_args(["fit", "--config", str(plain)]) == (DEFAULT, False)
    assert DEFAULT.module is SAutoMedModule
    assert family_for_args(["fit", "--config", str(named)]) == (FAMILIES["baseline"], True)
    assert family_for_args(["fit", f"--config={named}"])[0].module is BaselineModule
    # in order, as LightningCLI applies them: a later source wins
    assert requested_class_path(["--config", str(named), "--model.class_path", "SAutoMedModule"]) == (
        "SAutoMedModule"
    )
    both = [
        "fit",
        "--config",
        str(named),
        "--config",
        str(plain),
    ]  # the second names no class: the first holds
    assert family_for_args(both)[0].module is BaselineModule
    assert family_for_args(["fit", "--model.class_path=BaselineModule"])[0].module is BaselineModule


def test_every_shipped_config_names_the_family_it_means():
    configs = Path(__file__).resolve().parents[1] / "configs"
    for cfg in sorted(configs.glob("*.yaml")):
        family, _ = family_for_args(["fit", "--config", str(cfg)])
        expected = (
            "baseline"
            if cfg.name.startswith("unet")
            else "msam"
            if cfg.name.startswith("msam")
            else "sautomed"
        )
        assert family.name == expected, cfg.name
        if family.name != "baseline":
            continue
        raw = yaml.safe_load(cfg.read_text())
        args, data = raw["model"]["init_args"], raw["data"]
        unet = UNetSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in args["unet"].items()})
        network_plan(args["network"], unet)  # plannable: the patch is divisible by its strides
        size = data["preprocessing"]["image_size"]
        if args["network"] == "unet3d":
            assert tuple(data["patches"]["size"]) == unet.patch_size, cfg.name
            assert unet.patch_size[1] <= size and unet.patch_size[2] <= size, cfg.name
        else:
            assert "patches" not in data and unet.patch_size == (size, size), cfg.name


def test_unknown_class_path_is_one_line(tmp_path, capsys):
    assert main(["fit", "--model.class_path", "torch.nn.Linear"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sautomed: error: model.class_path 'torch.nn.Linear' is not a sautomed model")
    assert len(err.strip().splitlines()) == 1


def test_fit_records_the_family_in_checkpoint_and_config(baseline_run):
    kind, _, run = baseline_run
    for name in ("config.yaml", "last.ckpt", "best.ckpt", "splits.json"):
        assert (run / name).is_file(), name
    carried = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["sautomed"]
    assert carried["family"] == "baseline" and carried["network"]["kind"] == kind
    assert carried["split"]["train"] and carried["split"]["val"]  # the fit's cases, by image hash
    assert carried["class_names"] == CLASSES and carried["preprocessing"]["image_size"] == 32
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["class_path"] == CLASS_PATH and saved["model"]["init_args"]["network"] == kind


def test_test_writes_the_shared_metrics(baseline_run):
    _, cfg, run = baseline_run
    assert main(["test", "--config", str(cfg), "--ckpt_path", "best"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_cases"] == 2 and set(summary["per_class"]) == set(CLASSES)
    assert summary["checkpoint"].endswith("best.ckpt") and summary["config"]["family"] == "baseline"
    assert summary["predict_seconds_per_case"] > 0
    lines = (run / "metrics.csv").read_text().strip().splitlines()
    assert (
        lines[0] == "case,class,dsc,hd95_mm,status,slices_missed_at_ends,slices_beyond_ends"
        and len(lines) == 1 + 2 * 5
    )


def test_predict_writes_labels_on_the_input_grid(baseline_run, tiny_phantoms, tmp_path, capsys):
    _, _, run = baseline_run
    images = tiny_phantoms / "test" / "imagesTr"
    out = tmp_path / "out"
    argv = ["predict", "--ckpt_path", str(run / "last.ckpt"), "--input", str(images), "--output", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    for src in sorted(images.iterdir()):
        a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out / output_name(src)))
        assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
        assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
        assert b.GetPixelID() == sitk.sitkUInt8 and sitk.GetArrayFromImage(b).max() <= 5
    assert "wrote 2 of 2 outputs" in capsys.readouterr().err
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert isinstance(module_from_checkpoint(ckpt), BaselineModule)  # from the checkpoint alone


def test_predict_refuses_a_3d_sautomed_flag_for_a_baseline(baseline_run, tiny_phantoms, tmp_path, capsys):
    _, _, run = baseline_run
    src = next((tiny_phantoms / "test" / "imagesTr").iterdir())
    argv = ["predict", "--ckpt_path", str(run / "last.ckpt"), "--input", str(src), "--output", str(tmp_path)]
    assert main([*argv, "--mode", "end_to_end"]) == 1
    err = capsys.readouterr().err
    assert "--mode does not apply" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--encoder-bf16"]) == 1
    assert "--encoder-bf16 does not apply" in capsys.readouterr().err


def test_a_sautomed_checkpoint_is_refused_by_the_baseline(baseline_run, sautomed_ckpt, tmp_path, capsys):
    _, cfg, _ = baseline_run
    argv = ["test", "--config", str(cfg), "--ckpt_path", str(sautomed_ckpt)]
    assert main([*argv, "--trainer.default_root_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "checkpoint of model family 'sautomed', expected 'baseline'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match="family 'sautomed', expected 'baseline'"):
        BaselineModule.from_checkpoint_dict(torch.load(sautomed_ckpt, weights_only=True))


def test_a_baseline_checkpoint_is_refused_by_3d_sautomed(
    baseline_run, tiny_phantoms, tmp_path, capsys, make_config
):
    _, _, run = baseline_run
    cfg = make_config(tmp_path / "s.yaml", tiny_phantoms, tmp_path / "srun")
    assert main(["test", "--config", str(cfg), "--ckpt_path", str(run / "last.ckpt")]) == 1
    err = capsys.readouterr().err
    assert "checkpoint of model family 'baseline', expected 'sautomed'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_checkpoint_of_another_baseline_network_names_the_difference(baseline_run, tmp_path, capsys):
    kind, cfg, run = baseline_run
    argv = ["test", "--config", str(cfg), "--ckpt_path", str(run / "last.ckpt")]
    assert main([*argv, "--model.unet.base_filters", "8", "--trainer.default_root_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "base_filters: checkpoint 4 vs config 8" in err and len(err.strip().splitlines()) == 1


def test_data_that_does_not_fit_the_network_is_one_line(baseline_run, tmp_path, capsys):
    kind, cfg, _ = baseline_run
    change = ["--data.patches", "null"] if kind == "unet3d" else ["--data.patches.size", "[8, 32, 32]"]
    assert main(["fit", "--config", str(cfg), *change, "--trainer.default_root_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sautomed: error:")]
    assert len(errors) == 1 and "data.patches" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "last.ckpt").exists()


def test_training_batches_are_patches_or_windows_and_repeat_for_a_seed(baseline_run, monkeypatch):
    kind, cfg, run = baseline_run
    seen = []
    original = BaselineModule.training_step
    monkeypatch.setattr(
        BaselineModule,
        "training_step",
        lambda self, batch, i: seen.append(tuple(batch["image"].shape)) or original(self, batch, i),
    )
    again = ["--trainer.default_root_dir", str(run.parent / "again"), "--trainer.limit_val_batches", "0"]
    assert main(["fit", "--config", str(cfg), *again]) == 0
    expected = (2, 1, 8, 32, 32) if kind == "unet3d" else (2, 4, 32, 32)  # 2D: windows of n + 3 = 4 slices
    assert seen and all(s == expected for s in seen)
    a = torch.load(run / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run.parent / "again" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: the same run twice gives the same weights
    assert np.isfinite([float(v.float().sum()) for v in a.values()]).all()


def test_predict_names_a_checkpoint_family_it_does_not_know(sautomed_ckpt, tiny_phantoms, tmp_path, capsys):
    ckpt = torch.load(sautomed_ckpt, weights_only=True)
    ckpt["sautomed"]["family"] = "nnunet"
    path = tmp_path / "other.ckpt"
    torch.save(ckpt, path)
    src = next((tiny_phantoms / "test" / "imagesTr").iterdir())
    out = tmp_path / "o"
    assert main(["predict", "--ckpt_path", str(path), "--input", str(src), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "unknown model family 'nnunet'" in err and len(err.strip().splitlines()) == 1


def test_a_clock_schedule_needs_cosine_and_the_max_time_guard(baseline_run, tmp_path, capsys):
    _, cfg, _ = baseline_run
    base = ["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path)]
    clock = ["--model.init_args.schedule_by", "clock"]
    assert main([*base, *clock, "--model.init_args.scheduler", "poly"]) == 1
    assert "clock needs model.scheduler: cosine" in capsys.readouterr().err
    assert main([*base, *clock, "--model.init_args.scheduler", "cosine"]) == 1
    assert "clock needs a trainer.max_time guard" in capsys.readouterr().err
    assert main([*base, "--model.init_args.schedule_min_steps", "50"]) == 1  # by steps: nothing to warn of
    assert "schedule_min_steps (50) needs model.schedule_by: clock" in capsys.readouterr().err
    assert not (tmp_path / "last.ckpt").exists()


def test_a_clock_schedule_ends_at_zero_inside_the_guard(baseline_run, tmp_path, caplog):
    """max_epochs plans far more steps than the 1-second budget (max_time less the margin) allows, and the
    run says it trained fewer steps than its config's figures (model.schedule_min_steps)."""
    _, cfg, _ = baseline_run
    argv = ["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path)]
    argv += ["--trainer.max_epochs", "500", "--trainer.max_time", "00:00:05:00"]
    argv += ["--model.init_args.scheduler", "cosine", "--model.init_args.schedule_by", "clock"]
    argv += ["--model.init_args.schedule_min_steps", "100000"]
    with caplog.at_level(logging.WARNING, logger="sautomed"):
        assert main([*argv, "--model.init_args.schedule_margin_s", "299"]) == 0
    (line,) = [r.getMessage() for r in caplog.records if "model.schedule_min_steps" in r.getMessage()]
    assert "fewer than the 100000" in line
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert 0 < ckpt["global_step"] < 500 * 2  # stopped by its schedule, long before max_epochs
    assert ckpt["lr_schedulers"][0]["_last_lr"] == pytest.approx([0.0], abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "epochs", "samples"), [("unet2d", 60, 32), ("unet3d", 40, 16)])
def test_a_short_fit_learns_the_phantoms_liver(
    kind, epochs, samples, tiny_phantoms, make_unet_config, tmp_path
):
    """A DSC bar an untrained or broken U-Net cannot reach (it scores 0 on every class): 960 (2D) or 320 (3D)
    AdamW steps on 4 phantoms. Measured on 2026-12-06 (2-core CPU): unet2d liver 0.77, mean 0.42 (38 s);
    unet3d liver 0.80 (23 s)."""
    cfg = baseline_config(make_unet_config, tmp_path, tiny_phantoms, kind)
    doc = yaml.safe_load(cfg.read_text())
    doc["trainer"].update(max_epochs=epochs, check_val_every_n_epoch=100000)
    doc["model"]["init_args"].update(optimizer="adamw", lr=3e-3)
    which = "patches" if kind == "unet3d" else "windows"
    doc["data"][which]["samples_per_epoch"] = samples
    cfg.write_text(yaml.safe_dump(doc))
    assert main(["fit", "--config", str(cfg)]) == 0
    assert main(["test", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["per_class"]["liver"]["dsc"] > 0.6, summary["per_class"]
