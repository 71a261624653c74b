"""Several input channels the nnU-Net way (`case_0000` FLAIR, `case_0001` T1c): discovery, one-grid
check, preprocessing and cache, prediction planning, the M-SAM network, and fit -> test -> predict through
the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from test_msam_cli import msam_config

from sautomed.cli import main
from sautomed.data.errors import DatasetError, VolumeError
from sautomed.data.layouts import get_layout
from sautomed.data.lesion_phantom import make_lesion_phantoms
from sautomed.data.preprocess import Preprocessing, VolumeCache, preprocess
from sautomed.families import module_from_checkpoint
from sautomed.models.msam.checkpoint import export_sam_med3d, load_sam_med3d
from sautomed.models.msam.cutout import cut_out_lesion
from sautomed.models.msam.network import MSAMConfig, MSAMNet
from sautomed.models.msam.patches import CropSettings, MSAMDataModule
from sautomed.run_folder import read_checkpoint
from sautomed.writers import plan_predictions

SHARED_BRATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats-tumour"


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory) -> Path:
    """3 training lesion phantoms of 36^3 with a T1c-like channel 1, and 2 test ones of (32, 40, 36)."""
    root = tmp_path_factory.mktemp("twochannel")
    make_lesion_phantoms(root / "train", 3, seed=0, size=(36, 36, 36), channels=2)
    make_lesion_phantoms(root / "test", 2, seed=7, size=(32, 40, 36), channels=2)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- discovery, grid check, preprocessing ------------------------------------------------------------------


def test_discovery_pairs_each_case_with_its_channels(two_channel):
    layout = get_layout("nnunet", two_channel / "train", channels=2)
    cases = layout.cases()
    assert [c.case_id for c in cases] == ["lesion_000", "lesion_001", "lesion_002"]
    for c in cases:
        assert c.image.name == f"{c.case_id}_0000.nii.gz"
        assert [p.name for p in c.channels] == [f"{c.case_id}_0001.nii.gz"]
    loaded = layout.load(cases[0])
    assert loaded.image.shape == (2, 36, 36, 36) and loaded.label.shape == (36, 36, 36)
    flair, t1c = loaded.image
    lesion = loaded.label == 4  # enhancing rim: bright in T1c, not in FLAIR
    assert t1c[lesion].mean() > 1.3 * flair[lesion].mean()
    one = get_layout("nnunet", two_channel / "train").load(cases[0])  # the default still reads channel 0
    assert one.image.shape == (36, 36, 36) and np.array_equal(one.image, flair)


def test_a_missing_channel_is_named(two_channel, tmp_path):
    root = _copy(two_channel / "train", tmp_path / "d")
    (root / "imagesTr" / "lesion_001_0001.nii.gz").unlink()
    layout = get_layout("nnunet", root, channels=2)
    with pytest.raises(DatasetError, match=r"lesion_001: channel 1 missing \(.*lesion_001_0001.nii.gz\)"):
        layout.cases()
    assert [o.case_id for o in layout.orphans()] == ["lesion_001"]


def test_a_channel_on_another_grid_is_refused(two_channel, tmp_path):
    root = _copy(two_channel / "train", tmp_path / "d")
    path = root / "imagesTr" / "lesion_000_0001.nii.gz"
    img = sitk.ReadImage(str(path))
    img.SetSpacing(tuple(s * 1.2 for s in img.GetSpacing()))
    sitk.WriteImage(img, str(path))
    layout = get_layout("nnunet", root, channels=2)
    case = layout.cases()[0]
    with pytest.raises(
        VolumeError, match=r"lesion_000_0001.nii.gz: not on the grid of .*lesion_000_0000.*spacing"
    ):
        layout.load(case)
    layout.load(layout.cases()[1])  # the others load


def test_check_data_reports_a_channel_off_grid(two_channel, tmp_path, capsys):
    root = _copy(two_channel / "train", tmp_path / "d")
    path = root / "imagesTr" / "lesion_000_0001.nii.gz"
    img = sitk.ReadImage(str(path))
    img.SetOrigin(tuple(o + 5.0 for o in img.GetOrigin()))
    sitk.WriteImage(img, str(path))
    argv = ["check-data", "--layout", "nnunet", "--root", str(root)]
    assert main(argv) == 0  # one channel: channel 0 and the labels are fine
    assert main([*argv, "--channels", "2"]) == 1
    out = capsys.readouterr().out
    assert "channel 1" in out and "lesion_000_0001.nii.gz grid differs from channel 0: origin" in out
    assert "2 ok" in out


def test_more_channels_than_declared_or_another_layout_is_refused(two_channel, tmp_path):
    with pytest.raises(DatasetError, match="3 channels asked for, the dataset declares 2"):
        get_layout("nnunet", two_channel / "train", channels=3).cases()
    with pytest.raises(DatasetError, match="the folder layout has one"):
        get_layout("folder", two_channel / "train" / "imagesTr", channels=2)


def test_channels_are_normalised_each_on_its_own_and_cached(two_channel, tmp_path):
    layout = get_layout("nnunet", two_channel / "train", channels=2)
    case = layout.cases()[0]
    p = Preprocessing(image_size=24, normalization="percentile")
    cache = VolumeCache(tmp_path / "cache")
    first = cache.get(layout, case, p)
    assert first.image.shape == (2, 36, 24, 24) and first.label.shape == (36, 24, 24)
    loaded = layout.load(case)
    for k in range(2):  # each channel by its own percentiles: as if it were read alone
        alone, _ = preprocess(loaded.image[k], None, p)
        assert np.array_equal(first.image[k], alone)
    assert not np.array_equal(first.image[0], first.image[1])
    again = cache.get(layout, case, p)
    assert np.array_equal(first.image, again.image) and len(list((tmp_path / "cache").iterdir())) == 1
    single = cache.get(get_layout("nnunet", two_channel / "train"), case, p)  # another key
    assert single.image.shape == (36, 24, 24) and len(list((tmp_path / "cache").iterdir())) == 2
    assert np.array_equal(single.image, first.image[0])


def test_prediction_plan_takes_the_0000_files(two_channel, tmp_path):
    images = two_channel / "test" / "imagesTr"
    plan = plan_predictions(images, tmp_path / "out", overwrite=False, channels=2)
    assert [(s.name, d.name) for s, d in plan.jobs] == [
        ("lesion_000_0000.nii.gz", "lesion_000.nii.gz"),
        ("lesion_001_0000.nii.gz", "lesion_001.nii.gz"),
    ]
    assert sorted(p.name for p, _ in plan.ignored) == ["lesion_000_0001.nii.gz", "lesion_001_0001.nii.gz"]
    assert all("read with its _0000 file" in why for _, why in plan.ignored)
    with pytest.raises(
        ValueError, match="lesion_000_0001.nii.gz: channel 1 of lesion_000, read with its _0000"
    ):
        plan_predictions(images / "lesion_000_0001.nii.gz", tmp_path / "out", False, channels=2)
    plain = shutil.copy(images / "lesion_000_0000.nii.gz", tmp_path / "scan.nii.gz")
    with pytest.raises(ValueError, match="scan.nii.gz: not a case_0000 file of the model's 2 channels"):
        plan_predictions(Path(plain), tmp_path / "out", False, channels=2)
    one = plan_predictions(images, tmp_path / "out", overwrite=False)  # one channel: every file a case
    names = [d.name for _, d in one.jobs]  # the _0000 suffix goes, as nnU-Net names predictions
    assert names == [
        "lesion_000.nii.gz",
        "lesion_000_0001.nii.gz",
        "lesion_001.nii.gz",
        "lesion_001_0001.nii.gz",
    ]


def test_shared_brats_flair_and_t1c_share_one_grid():
    if not SHARED_BRATS.is_dir():
        pytest.fail(f"{SHARED_BRATS} missing; CI provides ../shared beside the project")
    layout = get_layout("nnunet", SHARED_BRATS, channels=2)
    case = layout.cases()[0]
    loaded = layout.load(case)
    assert loaded.image.shape == (2, 155, 240, 240) and not np.array_equal(loaded.image[0], loaded.image[1])


# -- network ---------------------------------------------------------------------------------------------


def test_a_sam_med3d_checkpoint_shares_its_kernel_over_the_channels():
    torch.manual_seed(0)
    one = MSAMNet(MSAMConfig(variant="tiny", image_size=32, lora_rank=0))
    sd = export_sam_med3d(one)
    two = MSAMNet(MSAMConfig(variant="tiny", image_size=32, lora_rank=0, in_channels=2))
    report = load_sam_med3d(two, sd)
    assert "image_encoder.patch_embed.proj.weight" in report.interpolated
    x = torch.rand(1, 1, 32, 32, 32) + 0.1
    with torch.no_grad():  # equal channels: the single-channel response
        assert torch.allclose(one.encode(x), two.encode(x.repeat(1, 2, 1, 1, 1)), atol=1e-5)
        assert not torch.allclose(two.encode(x.repeat(1, 2, 1, 1, 1)), two.encode(torch.cat([x, 2 * x], 1)))
    with pytest.raises(ValueError, match="2 input channels has no SAM-Med3D equivalent"):
        export_sam_med3d(two)


def test_cutout_paints_every_channel():
    image = torch.rand(1, 2, 16, 16, 16) + 0.5
    target = torch.zeros(1, 1, 16, 16, 16)
    target[0, 0, 4:12, 4:12, 4:12] = 1
    out = cut_out_lesion(image, target, 1.0, (0.3, 0.3), torch.Generator().manual_seed(0))
    changed = out != image
    assert changed[0, 0].any() and torch.equal(changed[0, 0], changed[0, 1])
    assert out[0, 0][changed[0, 0]].unique().numel() == 1 and out[0, 1][changed[0, 1]].unique().numel() == 1


def test_crops_carry_every_channel(two_channel, tmp_path):
    dm = MSAMDataModule(
        layout="nnunet",
        root=str(two_channel / "train"),
        folds=1,
        channels=2,
        crops=CropSettings(size=16, samples_per_epoch=4),
        batch_size=2,
        preprocessing=Preprocessing(image_size=36, normalization="percentile"),
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 2, 16, 16, 16) and batch["label"].shape == (2, 1, 16, 16, 16)
    assert not torch.equal(batch["image"][:, 0], batch["image"][:, 1])


# -- the CLI ---------------------------------------------------------------------------------------------


def _config(path: Path, data: Path, run_dir: Path, channels: int, in_channels: int) -> Path:
    """test_msam_cli's two-step tiny M-SAM config, on the 2-channel phantoms."""
    cfg = yaml.safe_load(msam_config(path, data, run_dir).read_text())
    model = cfg["model"]["init_args"]
    model["network"]["in_channels"] = in_channels
    model["refinement"] = {"iterations": 2, "cutout_probability": 0.5}
    model["evaluation"] = {"oracle_clicks": [1, 3]}
    cfg["data"].update(
        folds=1, channels=channels, preprocessing={"image_size": 36, "normalization": "percentile"}
    )
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_test_predict_with_two_channels(two_channel, tmp_path, capsys):
    cfg = _config(tmp_path / "c.yaml", two_channel, tmp_path / "run", 2, 2)
    assert main(["fit", "--config", str(cfg)]) == 0
    ckpt = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["sautomed"]["network"]["in_channels"] == 2
    assert main(["test", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["oracle_prompted"]["num_cases"] == 2

    scans = tmp_path / "scans"  # images only; one case lacks its T1c
    shutil.copytree(two_channel / "test" / "imagesTr", scans)
    shutil.copy(scans / "lesion_000_0000.nii.gz", scans / "lesion_009_0000.nii.gz")
    out = tmp_path / "out"
    argv = ["predict", "--ckpt_path", str(tmp_path / "run" / "last.ckpt"), "--input", str(scans)]
    assert main([*argv, "--output", str(out), "--no-progress"]) == 1  # the bad case fails, the rest go on
    err = capsys.readouterr().err
    assert "lesion_009_0001.nii.gz" in err and "wrote 2 of 3 outputs" in err and "Traceback" not in err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["lesion_000.nii.gz", "lesion_001.nii.gz"]
    for case in ("lesion_000", "lesion_001"):
        a, b = sitk.ReadImage(str(scans / f"{case}_0000.nii.gz")), sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
        assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()


def test_channels_and_in_channels_must_agree(two_channel, tmp_path, capsys):
    cfg = _config(tmp_path / "c.yaml", two_channel, tmp_path / "run", 2, 1)
    assert main(["fit", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "data.channels 2 and model.network.in_channels 1 differ" in err and "Traceback" not in err


# -- the 3D U-Net on the same channels (configs/unet3d_brats_small.yaml) -----------------------------------


def _unet3d_config(path: Path, data: Path, run_dir: Path, channels: int, in_channels: int) -> Path:
    """A tiny 3D U-Net of the baselines family on the 2-channel phantoms, whole tumour as one class."""
    label_map = path.parent / "whole.json"
    label_map.write_text(json.dumps({"classes": {"1": "lesion"}, "map": {str(k): 1 for k in range(1, 5)}}))
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
        },
        "model": {
            "class_path": "sautomed.models.baselines.module.BaselineModule",
            "init_args": {
                "network": "unet3d",
                "unet": {
                    "num_classes": 1,
                    "in_channels": in_channels,
                    "patch_size": [16, 16, 16],
                    "spacing": [1.0, 1.0, 1.0],
                    "base_filters": 4,
                    "max_filters": 8,
                },
            },
        },
        "data": {
            "layout": "nnunet",
            "root": str(data / "train"),
            "test_root": str(data / "test"),
            "label_map": str(label_map),
            "channels": channels,
            "folds": 1,
            "preprocessing": {"image_size": 36, "normalization": "percentile"},
            "patches": {"size": [16, 16, 16], "samples_per_epoch": 4},
            "batch_size": 2,
            "cache_dir": str(path.parent / "cache"),
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_3d_unet_reads_two_channels_in_fit_test_and_predict(two_channel, tmp_path, capsys):
    cfg = _unet3d_config(tmp_path / "u.yaml", two_channel, tmp_path / "run", 2, 2)
    assert main(["fit", "--config", str(cfg)]) == 0
    module = module_from_checkpoint(read_checkpoint(tmp_path / "run" / "last.ckpt"))
    assert module.input_channels == 2 and module.net.input_block.conv1.conv.in_channels == 2
    assert module.class_names == ("lesion",)
    assert main(["test", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_cases"] == 2 and list(summary["per_class"]) == ["lesion"]
    out = tmp_path / "out"
    scans = two_channel / "test" / "imagesTr"
    argv = ["predict", "--ckpt_path", str(tmp_path / "run" / "last.ckpt"), "-i", str(scans)]
    assert main([*argv, "-o", str(out), "--no-progress"]) == 0
    for case in ("lesion_000", "lesion_001"):
        a = sitk.ReadImage(str(two_channel / "test" / "imagesTr" / f"{case}_0000.nii.gz"))
        b = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert a.GetSize() == b.GetSize() and a.GetOrigin() == b.GetOrigin()
        assert a.GetDirection() == b.GetDirection()


def test_the_3d_unets_channels_must_match_the_data(two_channel, tmp_path, capsys):
    cfg = _unet3d_config(tmp_path / "u.yaml", two_channel, tmp_path / "run", 2, 1)
    assert main(["fit", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "data.channels 2 must equal model.unet.in_channels 1" in err and "Traceback" not in err
