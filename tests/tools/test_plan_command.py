"""`sautomed plan`: a config from the dataset alone, trainable without edits, its choices said; `fit
--data.root` without a config plans in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sautomed.cli import main

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
WEIGHTS = SHARED / "weights" / "lite_medsam.pth"
FEW_STEPS = [
    "--trainer.max_steps",
    "2",
    "--trainer.max_epochs",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAUTOMED_CACHE", str(tmp_path / "cache"))  # fingerprints of this test only


def test_plan_says_what_it_chose_and_writes_a_config_that_parses(tiny_phantoms, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert (
        main(["plan", "--root", str(tiny_phantoms / "train"), "--family", "unet2d", "--out", str(out)]) == 0
    )
    said = capsys.readouterr().out
    assert "sided classes (right_kidney, left_kidney): no left-right flips" in said
    assert "CT: window [" in said and "4 cases, 5 classes" in said
    text = out.read_text()
    assert text.startswith("# planned by `sautomed plan`:") and "../shared" not in text
    cfg = yaml.safe_load(text)
    assert cfg["model"]["init_args"]["unet"]["num_classes"] == 5
    assert cfg["data"]["preprocessing"]["normalization"] == "ct"
    assert "a training step measured here: " in said and "batch size 8: " in said  # the template's fits
    assert cfg["data"]["batch_size"] == 8
    assert main(["fit", "--config", str(out), "--print_config"]) == 0
    assert (
        main(["plan", "--root", str(tiny_phantoms / "train"), "--out", str(out)]) == 1
    )  # kept, not replaced
    assert "exists" in capsys.readouterr().err
    assert "from the cache" in _plan_again(tiny_phantoms, capsys)  # read once


def _plan_again(phantoms, capsys) -> str:
    assert main(["plan", "--root", str(phantoms / "train"), "--family", "unet2d"]) == 0
    return capsys.readouterr().out


def test_a_broken_case_stops_the_plan_naming_it(tiny_phantoms, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_phantoms / "train", root)
    (root / "imagesTr" / "phantom_001_0000.nii.gz").write_bytes(b"not a volume")
    assert main(["plan", "--root", str(root)]) == 1
    captured = capsys.readouterr()
    assert "phantom_001" in captured.out and "the data check found errors" in captured.err


@pytest.mark.slow
def test_fit_with_a_dataset_and_no_config_plans_and_trains(tmp_path, capsys):
    from sautomed.data.phantom import make_phantoms

    data = make_phantoms(
        tmp_path / "data", 2, seed=3, size=(6, 64, 64)
    )  # few slices: LiteMedSAM encodes them
    run = tmp_path / "run"
    argv = ["fit", "--data.root", str(data), "--trainer.default_root_dir", str(run)]
    argv += ["--trainer.limit_val_batches", "0"]  # the plan and a trained step are the point here
    argv += ["--model.network.sam_checkpoint", str(WEIGHTS), "--data.windows.augmented_copies", "1"]
    argv += ["--model.dense_pretrain_steps", "2", *FEW_STEPS]
    assert main(argv) == 0
    assert "no --config: planned" in capsys.readouterr().out
    assert (run / "plan.yaml").is_file() and (run / "last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("root", "family", "extra", "region"),
    [
        ("data/chaos-mr", "unet2d", [], None),
        ("data/segthor/train", "unet3d", ["--layout", "segthor", "--modality", "ct"], None),
        ("data/brats-tumour", "msam", [], "foreground"),  # skull-stripped: ~85 % constant background
    ],
    ids=["chaos-mr-unet2d", "segthor-unet3d", "brats-msam"],
)
def test_plans_of_the_shared_datasets_train(root, family, extra, region, tmp_path):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--root", str(SHARED / root), "--family", family, "--out", str(out), *extra]) == 0
    assert yaml.safe_load(out.read_text())["data"]["preprocessing"].get("percentile_region") == region
    fit = ["fit", "--config", str(out), "--trainer.default_root_dir", str(tmp_path / "run"), *FEW_STEPS]
    assert main([*fit, "--trainer.limit_val_batches", "0"]) == 0
    assert (tmp_path / "run" / "last.ckpt").is_file()


def _fingerprint(cases: int, slices: int):
    from sautomed.data.fingerprint import Fingerprint

    return Fingerprint(
        root="data",
        case_ids=[f"c{i}" for i in range(cases)],
        shapes_zyx=[[slices, 256, 256]] * cases,
        spacings_zyx=[[6.0, 1.5, 1.5]] * cases,
        class_names=["liver"],
        class_voxels=[1000],
        class_cases=[cases],
        foreground_percentiles={"0.5": 0.0, "50": 1.0, "99.5": 2.0},
        channel_names=["MR"],
        background_fractions=[0.0] * cases,
    )


def test_the_augmented_copies_come_down_until_the_encoding_fits_the_budget_and_the_cache_says_where():
    from sautomed.tools.plan import size_feature_cache

    per_slice = 256 * 32 * 32 * 2  # LiteMedSAM at S = 128, float16
    args = dict(image_size=128, budget_s=1200, seconds_per_slice=0.5, bytes_per_slice=per_slice)
    k, notes = size_feature_cache(_fingerprint(4, 35), 6, memory_bytes=24 * 2**30, **args)
    assert k == 6 and "down from" not in notes[0] and "in memory" in notes[-1]  # 140 slices x 6: 7 min
    k, notes = size_feature_cache(_fingerprint(8, 35), 6, memory_bytes=24 * 2**30, **args)
    assert k == 3 and "down from 6" in notes[0]  # 280 slices: 3 copies are 7 min, 35% of 20
    k, notes = size_feature_cache(_fingerprint(8, 35), 6, memory_bytes=2**30 // 2, **args)
    assert "memory-mapped on disk" in notes[-1]  # 0.4 GiB of cache on a machine of 0.5 GiB
    k, notes = size_feature_cache(_fingerprint(100, 40), 6, memory_bytes=24 * 2**30, **args)
    assert k == 1 and any("warning: even one copy needs 33.3 min" in n for n in notes)


def test_a_sautomed_plan_times_the_frozen_encoder_on_this_machine(tiny_phantoms, capsys):
    assert main(["plan", "--root", str(tiny_phantoms / "train")]) == 0
    said = capsys.readouterr().out
    assert "frozen encoder: " in said and " s a slice at S = 128 measured here" in said
    assert "feature cache " in said


def _probe(fixed_gib: float, per_gib: float, smallest: int):
    """A stand-in for the measured step: ``fixed + batch x per`` GiB, per sample x 8 per halving above
    ``smallest`` (the patch's side)."""
    from sautomed.tools.memory import GIB, StepMemory

    def measure(family, model, device="cpu"):
        side = model["unet"]["patch_size"][-1] if "unet" in model else model["network"]["image_size"]
        return StepMemory(int(fixed_gib * GIB), int(per_gib * GIB * (side / smallest) ** 3))

    return measure


def test_the_batch_comes_down_then_the_patch_halves_until_a_step_fits_the_memory(monkeypatch):
    from sautomed.errors import UserError
    from sautomed.tools import memory
    from sautomed.tools.memory import GIB, fit_batch_to_memory, largest_batch

    model = {"unet": {"patch_size": [16, 64, 64]}}
    monkeypatch.setattr(memory, "measure_step", _probe(0.5, 0.25, 16))  # 64: 16 GiB a sample
    assert largest_batch(memory.StepMemory(GIB, GIB), 3 * GIB, 8) == 2
    assert largest_batch(memory.StepMemory(GIB, 0), GIB // 2, 8) == 0
    sized, batch, _, notes = fit_batch_to_memory("unet3d", model, 2, 40 * GIB)
    assert (sized, batch) == (model, 2) and "fits the memory" in notes[-1]  # 32.5 GiB
    sized, batch, _, notes = fit_batch_to_memory("unet3d", model, 2, 20 * GIB)
    assert batch == 1 and "down from 2" in notes[-1]
    sized, batch, _, notes = fit_batch_to_memory("unet3d", model, 2, 3 * GIB)  # 32: 2 GiB a sample
    assert sized["unet"]["patch_size"] == [8, 32, 32] and batch == 1
    assert any("unet.patch_size [16, 64, 64] -> [8, 32, 32]" in n for n in notes)
    assert model["unet"]["patch_size"] == [16, 64, 64]  # the caller's settings are left alone
    with pytest.raises(UserError, match="at batch 1 needs .* more memory"):
        fit_batch_to_memory("unet3d", model, 2, GIB // 4)
    msam = {"network": {"image_size": 64}}
    sized, batch, _, _ = fit_batch_to_memory("msam", msam, 2, 3 * GIB)
    assert sized["network"]["image_size"] == 32 and batch == 1  # 64 -> 32: 0.5 + 2 GiB a sample
    with pytest.raises(UserError):  # M-SAM's crop stays at 32 or more
        fit_batch_to_memory("msam", msam, 2, 2 * GIB)


def test_plan_sizes_the_batch_for_the_memory_it_is_given(tiny_phantoms, tmp_path, capsys, monkeypatch):
    from sautomed.tools import memory

    monkeypatch.setattr(memory, "measure_step", _probe(0.5, 0.25, 16))
    out = tmp_path / "plan.yaml"
    root = str(tiny_phantoms / "train")
    assert main(["plan", "--root", root, "--family", "unet3d", "--memory", "3G", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "memory: 3.0 GiB given (--memory)" in said
    cfg = yaml.safe_load(out.read_text())
    patch = cfg["model"]["init_args"]["unet"]["patch_size"]
    assert cfg["data"]["patches"]["size"] == patch and cfg["data"]["batch_size"] >= 1
    assert 0.5 + cfg["data"]["batch_size"] * 0.25 * (patch[-1] / 16) ** 3 <= 0.7 * 3  # it fits
    assert memory.memory_size("512M") == 512 * 2**20 and memory.memory_size("16GiB") == 16 * 2**30
    assert main(["plan", "--root", root, "--family", "unet3d", "--memory", "lots"]) == 1
    assert "--memory 'lots'" in capsys.readouterr().err
