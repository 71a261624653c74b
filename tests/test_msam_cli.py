"""M-SAM through the CLI in-process: fit -> test -> predict of the tiny network on lesion phantoms, refused
checkpoints of the other families, and the shipped configs/msam_*.yaml."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import lightning
import pytest
import SimpleITK as sitk
import torch
import yaml

from sautomed.cli import main
from sautomed.data.io import from_canonical
from sautomed.data.lesion_phantom import make_lesion_phantoms
from sautomed.families import FAMILIES, family_for_args, module_from_checkpoint
from sautomed.models.msam.module import MSAMModule, oracle_class_name
from sautomed.models.msam.session import Click, ClickSession
from sautomed.models.sautomed.module import SAutoMedModule
from sautomed.models.sautomed.network import NetworkConfig
from sautomed.run_folder import read_checkpoint
from sautomed.writers import output_name

CLASS_PATH = "sautomed.models.msam.module.MSAMModule"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLICKS = (1, 3, 5, 10)


def msam_config(path: Path, lesions: Path, run_dir: Path) -> Path:
    """The tiny M-SAM (S = 32) on 40^3 lesion phantoms, two optimiser steps."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(run_dir),
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "max_epochs": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
        },
        "model": {
            "class_path": CLASS_PATH,
            "init_args": {
                "network": {"variant": "tiny", "image_size": 32},
                "refinement": {"iterations": 3, "prompt_free_probability": 0.5},
                "evaluation": {"oracle_clicks": list(CLICKS)},
                "automatic": {"self_prompt_iterations": 1, "min_component_voxels": 5},
                "lr": 1e-3,
            },
        },
        "data": {
            "layout": "nnunet",
            "root": str(lesions / "train"),
            "test_root": str(lesions / "test"),
            "folds": 2,
            "preprocessing": {"image_size": 40, "normalization": "percentile"},
            "crops": {"size": 32, "samples_per_epoch": 4},
            "batch_size": 2,
            "cache_dir": str(path.parent / "cache"),
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def lesions(tmp_path_factory) -> Path:
    """4 training lesion phantoms of 40^3 and 2 test ones of (36, 44, 40): the test grid is not the crops'."""
    root = tmp_path_factory.mktemp("lesions")
    make_lesion_phantoms(root / "train", 4, seed=0, size=(40, 40, 40))
    make_lesion_phantoms(root / "test", 2, seed=7, size=(36, 44, 40))
    return root


@pytest.fixture(scope="module")
def msam_run(lesions, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run folder) of a two-step fit through the CLI."""
    base = tmp_path_factory.mktemp("msam")
    cfg = msam_config(base / "msam.yaml", lesions, base / "run")
    assert main(["fit", "--config", str(cfg)]) == 0
    return cfg, base / "run"


@pytest.fixture(scope="module")
def sautomed_ckpt(tmp_path_factory) -> Path:
    """An (untrained) tiny 3D-SAutoMed checkpoint as the run folder would hold it."""
    module = SAutoMedModule(
        NetworkConfig(backbone="tiny", image_size=64, num_classes=5, encoder_finetune="full")
    )
    module.class_names = ("liver", "right_kidney", "left_kidney", "spleen", "aorta")
    module.preprocessing = {"image_size": 64, "normalization": "ct"}
    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0}
    ckpt["pytorch-lightning_version"] = lightning.__version__
    module.on_save_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("sautomed") / "sautomed.ckpt"
    torch.save(ckpt, path)
    return path


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("sautomed: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_msam_is_a_family_of_the_cli(msam_run):
    cfg, run = msam_run
    assert FAMILIES["msam"].module is MSAMModule
    assert family_for_args(["fit", "--config", str(cfg)]) == (FAMILIES["msam"], True)
    for name in ("config.yaml", "last.ckpt", "best.ckpt", "splits.json"):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    carried = ckpt["sautomed"]
    assert carried["family"] == "msam" and carried["network"]["variant"] == "tiny"
    assert carried["class_names"] == ["lesion"] and carried["preprocessing"]["image_size"] == 40
    assert len(carried["split"]["train"]) == 2 and len(carried["split"]["val"]) == 2  # by image hash
    assert isinstance(module_from_checkpoint(ckpt), MSAMModule)  # predict's path: the checkpoint alone
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["class_path"] == CLASS_PATH


def test_test_writes_oracle_prompted_and_automatic_dsc(msam_run):
    cfg, run = msam_run
    assert main(["test", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["modes"]) == {"automatic", "oracle_prompted"}
    oracle = summary["oracle_prompted"]
    assert oracle["progressive_merge"] is False  # the default: the network's own prediction after each click
    assert oracle["num_cases"] == 2 and list(oracle["dsc_after_clicks"]) == [str(k) for k in CLICKS]
    for k in CLICKS:
        assert 0.0 <= oracle["dsc_after_clicks"][str(k)] <= 1.0
        assert summary[f"oracle_dsc@{k}"] == oracle["dsc_after_clicks"][str(k)]
    assert 0.0 <= summary["mean_dsc"] <= 1.0 and summary["num_cases"] == 2  # automatic: the shared keys
    assert list(summary["per_class"]) == ["lesion"] and summary["config"]["family"] == "msam"
    assert summary["checkpoint"].endswith("last.ckpt") and summary["overlaps_training"] == []
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_class: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_class.setdefault(r["class"], []).append(r)
    expected = {"lesion", *(oracle_class_name(k) for k in CLICKS)}
    assert set(by_class) == expected and all(len(v) == 2 for v in by_class.values())
    assert oracle_class_name(1) == "lesion (oracle-prompted, 1 click)"
    assert oracle_class_name(10) == "lesion (oracle-prompted, 10 clicks)"
    for k in CLICKS:
        for r in by_class[oracle_class_name(k)]:
            assert r["status"] == "oracle_prompted" and r["hd95_mm"] == "" and 0 <= float(r["dsc"]) <= 1
    assert all(r["status"] != "oracle_prompted" for r in by_class["lesion"])
    assert (run / "report.html").is_file()


def test_testing_on_training_cases_says_so(msam_run, lesions, tmp_path):
    cfg, run = msam_run
    argv = ["test", "--config", str(cfg), "--ckpt_path", str(run / "last.ckpt")]
    moved = ["--data.test_root", str(lesions / "train"), "--trainer.default_root_dir", str(tmp_path)]
    assert main([*argv, *moved]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    trained = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["sautomed"]["split"]
    assert summary["num_cases"] == 4 and summary["overlaps_training"] == sorted(trained["train"])
    assert summary["best_ckpt_chosen_on"] == sorted(trained["val"])
    assert summary["checkpoint_chosen_on"] == []  # last.ckpt: no validation chose it


def test_predict_writes_labels_on_the_input_grid_without_ground_truth(msam_run, lesions, tmp_path, capsys):
    _, run = msam_run
    scans = tmp_path / "scans"  # images only: no labels, no dataset.json
    scans.mkdir()
    for src in sorted((lesions / "test" / "imagesTr").iterdir()):
        shutil.copy(src, scans / src.name)
    out = tmp_path / "out"
    argv = ["predict", "--ckpt_path", str(run / "last.ckpt"), "--input", str(scans), "--output", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    for src in sorted(scans.iterdir()):
        a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out / output_name(src)))
        assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
        assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
        assert b.GetPixelID() == sitk.sitkUInt8 and set(sitk.GetArrayFromImage(b).ravel()) <= {0, 1}
    assert "wrote 2 of 2 outputs" in capsys.readouterr().err
    assert (out / "labels.json").is_file()


def test_predict_applies_a_users_clicks_per_case_and_reports_a_bad_one(
    msam_run, lesions, sautomed_ckpt, tmp_path, capsys
):
    """--clicks: the named case starts empty and gets its positive clicks (mm and voxel) on the input grid; a
    case whose click lies outside its volume fails alone; a case the file names but no input has, and a
    checkpoint of another family, are refused in one line."""
    _, run = msam_run
    scans = tmp_path / "scans"
    scans.mkdir()
    for src in sorted((lesions / "test" / "imagesTr").iterdir()):
        shutil.copy(src, scans / src.name)
    first, second = sorted(scans.iterdir())
    img = sitk.ReadImage(str(first))
    mm = img.TransformIndexToPhysicalPoint((20, 22, 18))
    clicks = {
        "start": "empty",
        "cases": {
            output_name(first).split(".")[0]: [
                {"point": list(mm), "space": "mm", "label": "positive"},
                {"point": [20, 22, 18], "space": "voxel", "label": "positive"},
            ],
            output_name(second).split(".")[0]: [{"point": [500, 0, 0], "space": "voxel"}],
        },
    }
    (tmp_path / "clicks.json").write_text(json.dumps(clicks))
    out = tmp_path / "out"
    argv = [
        "predict",
        "--ckpt_path",
        str(run / "last.ckpt"),
        "-i",
        str(scans),
        "-o",
        str(out),
        "--no-progress",
    ]
    assert main([*argv, "--clicks", str(tmp_path / "clicks.json")]) == 1  # one case failed
    err = capsys.readouterr().err
    assert f"failed {second}" in err and "lies outside the volume" in err and "wrote 1 of 2 outputs" in err
    written = sitk.ReadImage(str(out / output_name(first)))
    assert written.GetOrigin() == img.GetOrigin() and written.GetDirection() == img.GetDirection()
    assert not (out / output_name(second)).exists()
    # the same clicks from Python: the same mask
    session = ClickSession.for_volume(
        module_from_checkpoint(read_checkpoint(run / "last.ckpt")), first, "empty"
    )
    session.click(Click(tuple(mm), space="mm"))
    session.click(Click((20, 22, 18)))
    assert (from_canonical(session.labels(), session.geom) == sitk.GetArrayFromImage(written)).all()

    clicks["cases"]["not_a_case"] = []
    (tmp_path / "more.json").write_text(json.dumps(clicks))
    argv[-2] = str(tmp_path / "out2")
    assert main([*argv, "--clicks", str(tmp_path / "more.json")]) == 1
    assert "no input for case(s) not_a_case" in _one_error_line(capsys.readouterr().err)
    argv[2] = str(sautomed_ckpt)
    assert main([*argv, "--clicks", str(tmp_path / "clicks.json")]) == 1
    assert "only M-SAM checkpoints take clicks" in _one_error_line(capsys.readouterr().err)


def test_predict_refuses_a_flag_of_another_family(msam_run, lesions, tmp_path, capsys):
    _, run = msam_run
    src = next((lesions / "test" / "imagesTr").iterdir())
    argv = ["predict", "--ckpt_path", str(run / "last.ckpt"), "--input", str(src), "--output", str(tmp_path)]
    assert main([*argv, "--mode", "end_to_end"]) == 1
    assert "--mode does not apply to this checkpoint's model (MSAMModule)" in _one_error_line(
        capsys.readouterr().err
    )


def test_an_msam_checkpoint_is_refused_by_3d_sautomed(msam_run, tiny_phantoms, tmp_path, capsys, make_config):
    _, run = msam_run
    cfg = make_config(tmp_path / "s.yaml", tiny_phantoms, tmp_path / "srun")
    assert main(["test", "--config", str(cfg), "--ckpt_path", str(run / "last.ckpt")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "checkpoint of model family 'msam', expected 'sautomed'" in line


def test_a_3d_sautomed_checkpoint_is_refused_by_msam(msam_run, sautomed_ckpt, tmp_path, capsys):
    cfg, _ = msam_run
    argv = ["test", "--config", str(cfg), "--ckpt_path", str(sautomed_ckpt)]
    assert main([*argv, "--trainer.default_root_dir", str(tmp_path)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "checkpoint of model family 'sautomed', expected 'msam'" in line
    assert not (tmp_path / "summary.json").exists()


def test_an_msam_checkpoint_of_another_network_names_the_difference(msam_run, tmp_path, capsys):
    cfg, run = msam_run
    argv = ["test", "--config", str(cfg), "--ckpt_path", str(run / "last.ckpt")]
    changed = ["--model.init_args.network.image_size", "48", "--trainer.default_root_dir", str(tmp_path)]
    assert main([*argv, *changed]) == 1
    assert "image_size: checkpoint 32 vs config 48" in _one_error_line(capsys.readouterr().err)


def test_model_and_data_targets_must_agree(msam_run, tmp_path, capsys):
    cfg, _ = msam_run
    argv = ["fit", "--config", str(cfg), "--model.init_args.foreground_labels", "[1, 4]"]
    assert main([*argv, "--trainer.default_root_dir", str(tmp_path)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "model.foreground_labels [1, 4] and data.foreground_labels None differ" in line
    assert not (tmp_path / "last.ckpt").exists()


def test_a_clock_schedule_needs_the_max_time_guard_and_cosine(msam_run, tmp_path, capsys):
    cfg, _ = msam_run
    base = ["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path)]
    clock = ["--model.init_args.schedule_by", "clock"]
    assert main([*base, *clock, "--model.init_args.scheduler", "cosine"]) == 1
    assert "clock needs a trainer.max_time guard" in _one_error_line(capsys.readouterr().err)
    assert main([*base, *clock, "--model.init_args.scheduler", "multistep"]) == 1
    assert "clock needs model.scheduler: cosine" in _one_error_line(capsys.readouterr().err)
    assert main([*base, "--model.init_args.schedule_min_steps", "-3"]) == 1
    assert "schedule_min_steps must be >= 0, got -3" in _one_error_line(capsys.readouterr().err)
    assert main([*base, "--model.init_args.schedule_min_steps", "50"]) == 1  # by steps: nothing to warn of
    assert "needs model.schedule_by: clock" in _one_error_line(capsys.readouterr().err)


def test_a_clock_ended_fit_short_of_its_configs_steps_warns(msam_run, tmp_path, caplog):
    cfg, _ = msam_run
    argv = ["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path)]
    argv += ["--trainer.max_steps", "-1", "--trainer.max_epochs", "500", "--trainer.max_time", "00:00:05:00"]
    argv += ["--model.init_args.scheduler", "cosine", "--model.init_args.schedule_by", "clock"]
    argv += ["--model.init_args.schedule_margin_s", "299", "--model.init_args.schedule_min_steps", "100000"]
    with caplog.at_level(logging.WARNING, logger="sautomed"):
        assert main(argv) == 0
    (line,) = [r.getMessage() for r in caplog.records if "model.schedule_min_steps" in r.getMessage()]
    assert "fewer than the 100000" in line
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert 0 < ckpt["global_step"] < 500 * 2  # the clock, not max_epochs, ended it


def test_the_multistep_schedule_lowers_the_rates_at_the_milestones(msam_run, tmp_path):
    cfg, _ = msam_run
    argv = ["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path)]
    steps = ["--trainer.max_steps", "-1", "--trainer.max_epochs", "2"]
    sched = ["--model.init_args.scheduler", "multistep", "--model.init_args.milestones", "[1]"]
    assert main([*argv, *steps, *sched, "--data.crops.samples_per_epoch", "2"]) == 0
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["lr_schedulers"][0]
    assert dict(state["milestones"]) == {1: 1} and state["gamma"] == 0.1
    # after epoch 1: the encoder / MEA at lr x 0.1, the prompt encoder and decoder at lr x 0.1 x 0.1
    assert state["_last_lr"] == pytest.approx([1e-4, 1e-4, 1e-5])


OVERLAYS = ("msam_brats_flair.yaml",)  # used on top of msam_brats.yaml


@pytest.mark.parametrize(
    "cfg", sorted(p for p in CONFIGS.glob("msam_*.yaml") if p.name not in OVERLAYS), ids=lambda p: p.name
)
def test_every_msam_config_parses_and_names_the_msam_family(cfg, capsys):
    assert main(["fit", "--config", str(cfg), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == CLASS_PATH
    assert family_for_args(["fit", "--config", str(cfg)])[0].name == "msam"
    model, data, trainer = printed["model"]["init_args"], printed["data"], printed["trainer"]
    assert data["crops"]["size"] == model["network"]["image_size"]
    assert data["foreground_labels"] == model["foreground_labels"]
    assert data["layout"] == "nnunet"
    if cfg.name == "msam_brats.yaml":  # the CPU run: tiny, inside a 20-minute guard, by the clock
        assert trainer["accelerator"] == "cpu" and trainer["max_time"] == "00:00:20:00"
        assert model["network"]["variant"] == "tiny" and model["network"]["sam_med3d_checkpoint"] is None
        assert model["scheduler"] == "cosine" and model["schedule_by"] == "clock"
        assert data["root"] == "data/brats"  # no shipped config names ../shared
        return
    # the paper's settings (the public train_msam.py)
    assert model["network"]["variant"] == "vit_b_ori" and model["network"]["image_size"] == 128
    assert model["network"]["fusion"] == "mea" and model["network"]["lora_rank"] == 4
    assert model["lr"] == 8e-4 and model["lr"] * model["decoder_lr_scale"] == pytest.approx(8e-5)
    assert model["weight_decay"] == 0.1 and model["scheduler"] == "multistep"
    assert model["milestones"] == [120, 180] and model["gamma"] == 0.1
    assert model["refinement"]["iterations"] == 11
    assert trainer["max_epochs"] == 200 and trainer["accelerator"] == "gpu" and data["batch_size"] == 8
    assert data["root"] in ("data/KiTS", "data/LiTS")


def test_brats_reads_flair_and_t1c_and_the_flair_overlay_one_channel_into_its_own_run_folder(capsys):
    argv = ["fit", "--config", str(CONFIGS / "msam_brats.yaml")]
    assert main([*argv, "--print_config"]) == 0
    both = yaml.safe_load(capsys.readouterr().out)
    assert both["data"]["channels"] == both["model"]["init_args"]["network"]["in_channels"] == 2
    assert main([*argv, "--config", str(CONFIGS / "msam_brats_flair.yaml"), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["channels"] == printed["model"]["init_args"]["network"]["in_channels"] == 1
    assert printed["trainer"]["default_root_dir"] == "runs/msam_brats_flair"
    assert printed["model"]["init_args"]["network"]["local_head"] is True  # the rest: msam_brats.yaml's


def test_the_brats_config_ends_its_schedule_by_the_clock_inside_its_guard():
    raw = yaml.safe_load((CONFIGS / "msam_brats.yaml").read_text())
    model = raw["model"]["init_args"]
    assert model["scheduler"] == "cosine" and model["schedule_by"] == "clock"
    assert 0 < model["schedule_margin_s"] < 5 * 60 and raw["trainer"]["max_time"] == "00:00:20:00"
    assert model["network"]["click_maps"] is True  # what made the clicks count on this budget


def test_clicks_alone_still_write_metrics_and_monitor_a_fit(lesions, tmp_path):
    """evaluation.automatic off: a validating fit keeps a monitor (the oracle DSC after the most clicks)
    and validate writes metrics.csv / summary.json with the oracle-prompted rows."""
    cfg = msam_config(tmp_path / "m.yaml", lesions, tmp_path / "run")
    doc = yaml.safe_load(cfg.read_text())
    doc["model"]["init_args"]["evaluation"]["automatic"] = False
    cfg.write_text(yaml.safe_dump(doc))
    assert main(["fit", "--config", str(cfg)]) == 0
    assert (tmp_path / "run" / "best.ckpt").is_file()  # chosen on val/mean_dsc, which is logged
    assert main(["validate", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["oracle_prompted"]["num_cases"] == 2 and summary["predict_seconds_per_case"] is None
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * len(CLICKS) and all("oracle_prompted" in r for r in rows[1:])
