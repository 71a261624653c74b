"""Refusals where a wrong run would look right: LoRA on a random encoder, splits, tests on training cases."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sautomed.cli import main
from sautomed.models.sautomed.module import SAutoMedModule
from sautomed.models.sautomed.network import NetworkConfig
from sautomed.run_folder import UserError

REPO = Path(__file__).resolve().parents[1]


def _lora_cfg() -> NetworkConfig:
    return NetworkConfig(backbone="tiny", image_size=32, num_classes=2, encoder_finetune="lora")


def test_lora_without_sam_checkpoint_is_refused_naming_both_ways_out():
    with pytest.raises(UserError) as err:
        SAutoMedModule(network=_lora_cfg())
    text = str(err.value)
    assert "model.network.sam_checkpoint" in text and "encoder_finetune: full" in text
    assert len(text.splitlines()) == 1
    SAutoMedModule(
        network=NetworkConfig(backbone="tiny", image_size=32, num_classes=2, encoder_finetune="full")
    )


def test_a_frozen_random_encoder_is_refused_in_every_family():
    from sautomed.models.msam.network import MSAMConfig, MSAMNet

    frozen = NetworkConfig(backbone="tiny", image_size=32, num_classes=2, encoder_finetune="frozen")
    with pytest.raises(UserError, match="encoder_finetune is 'frozen' but no model.network.sam_checkpoint"):
        SAutoMedModule(network=frozen)
    for mode in ("frozen", "lora"):
        cfg = MSAMConfig(variant="tiny", image_size=32, encoder_finetune=mode, lora_rank=2)
        with pytest.raises(UserError, match=f"'{mode}' but no model.network.sam_med3d_checkpoint"):
            MSAMNet(cfg)
    MSAMNet(MSAMConfig(variant="tiny", image_size=32, encoder_finetune="full"))
    MSAMNet(MSAMConfig(variant="tiny", image_size=32))  # auto: full without a checkpoint


def test_lora_module_rebuilt_from_a_trained_checkpoint_is_not_refused():
    from sautomed.guards import weights_from_elsewhere

    with weights_from_elsewhere():
        trained = SAutoMedModule(network=_lora_cfg())
    trained.preprocessing = {}
    ckpt = {"sautomed": trained.family_config(), "state_dict": trained.state_dict()}
    rebuilt = SAutoMedModule.from_checkpoint_dict(ckpt)
    assert rebuilt.network_cfg.encoder_finetune == "lora"
    with pytest.raises(UserError):  # the context ends with the block
        SAutoMedModule(network=_lora_cfg())


def test_btcv_fit_without_checkpoint_is_one_line_before_touching_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # runs/btcv and data/btcv are relative to the working folder
    code = main(["fit", "--config", str(REPO / "configs" / "btcv.yaml"), "--trainer.fast_dev_run", "1"])
    err = capsys.readouterr().err
    assert code == 1
    (line,) = err.strip().splitlines()  # the only line: before seeding, building or reading anything
    assert (
        line.startswith("sautomed: error:") and "sam_checkpoint" in line and "encoder_finetune: full" in line
    )
    assert not (tmp_path / "runs").exists()


def test_test_with_ckpt_path_of_a_lora_run_is_not_refused(trained_run, tmp_path):
    cfg, run = trained_run
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["sautomed"]["network"]["encoder_finetune"] = "lora"  # same parameters, other trainable set
    torch.save(ckpt, tmp_path / "lora.ckpt")
    config = yaml.safe_load(Path(cfg).read_text())
    config["model"]["network"]["encoder_finetune"] = "lora"
    config["trainer"]["default_root_dir"] = str(tmp_path / "eval")
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(config))
    assert (
        main(["test", "--config", str(tmp_path / "lora.yaml"), "--ckpt_path", str(tmp_path / "lora.ckpt")])
        == 0
    )
    assert (tmp_path / "eval" / "summary.json").is_file()


def _evaluate(cfg: Path, ckpt: Path, out: Path, *extra: str) -> dict:
    args = ["test", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(out)]
    assert main([*args, *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_test_over_training_cases_names_them(trained_run, tiny_phantoms, tmp_path, caplog):
    cfg, run = trained_run
    (fold0,) = json.loads((run / "splits.json").read_text())[:1]
    held_out = _evaluate(cfg, run / "best.ckpt", tmp_path / "held_out")
    assert held_out["overlaps_training"] == [] and held_out["best_ckpt_chosen_on"] == fold0["val"]
    assert held_out["checkpoint_chosen_on"] == fold0["val"]  # best.ckpt: validation on them chose it
    last = _evaluate(cfg, run / "last.ckpt", tmp_path / "held_out_last")
    assert last["checkpoint_chosen_on"] == [] and last["best_ckpt_chosen_on"] == fold0["val"]  # chose nothing
    with caplog.at_level(logging.WARNING, logger="sautomed"):
        summary = _evaluate(
            cfg, run / "best.ckpt", tmp_path / "on_train", "--data.test_root", str(tiny_phantoms / "train")
        )
    assert summary["num_cases"] == 4
    assert summary["overlaps_training"] == fold0["train"]  # found by content, whatever the folder
    assert summary["best_ckpt_chosen_on"] == fold0["val"]
    (line,) = [r.getMessage() for r in caplog.records if "training cases of the checkpoint" in r.getMessage()]
    assert all(case in line for case in fold0["train"])


def test_a_fit_that_never_validates_chose_no_checkpoint(make_config, tiny_phantoms, tmp_path):
    run = tmp_path / "run"
    cfg = make_config(tmp_path / "tiny.yaml", tiny_phantoms, run)
    assert main(["fit", "--config", str(cfg), "--trainer.check_val_every_n_epoch", "1000"]) == 0
    assert not (run / "best.ckpt").exists()
    summary = _evaluate(cfg, run / "last.ckpt", tmp_path / "eval")
    assert summary["best_ckpt_chosen_on"] is None and summary["checkpoint_chosen_on"] == []
    assert summary["overlaps_training"] == []  # it still knows its training cases


def test_test_and_predict_give_the_same_labels(trained_run, tiny_phantoms, tmp_path, monkeypatch):
    cfg, run = trained_run
    seen: dict[str, list[np.ndarray]] = {"inputs": [], "labels": []}
    original = SAutoMedModule.segment_volume

    def recording(self, image, out_hw, mode=None):
        labels = original(self, image, out_hw, mode)
        seen["inputs"].append(image.clone())
        seen["labels"].append(labels)
        return labels

    monkeypatch.setattr(SAutoMedModule, "segment_volume", recording)
    _evaluate(cfg, run / "best.ckpt", tmp_path / "eval")
    tested = dict(seen)
    seen = {"inputs": [], "labels": []}
    images = sorted((tiny_phantoms / "test" / "imagesTr").iterdir())
    for path in images:  # one input per call: the same order as the test's sorted cases
        args = ["predict", "--ckpt_path", str(run / "best.ckpt"), "--input", str(path), "--no-progress"]
        assert main([*args, "--output", str(tmp_path / "pred")]) == 0
    assert len(tested["labels"]) == len(seen["labels"]) == len(images) == 2
    for a, b in zip(tested["inputs"], seen["inputs"]):
        assert a.dtype == b.dtype and torch.equal(a, b)  # the very same model input
    for a, b in zip(tested["labels"], seen["labels"]):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_from_before_a_setting_existed_loads_as_its_default(trained_run, tmp_path, capsys):
    """An older checkpoint does not record settings added since; they count as their defaults (what the
    older version ran), and only a real difference is refused."""
    cfg, run = trained_run
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    for key in ("context", "sam_decoder_finetune"):  # both added after the first releases
        assert ckpt["sautomed"]["network"].pop(key) == getattr(NetworkConfig(), key)
    torch.save(ckpt, tmp_path / "old.ckpt")
    args = ["test", "--config", str(cfg), "--ckpt_path", str(tmp_path / "old.ckpt")]
    assert main([*args, "--trainer.default_root_dir", str(tmp_path / "eval")]) == 0
    changed = [*args, "--trainer.default_root_dir", str(tmp_path / "x"), "--model.network.history", "false"]
    assert main(changed) == 1
    assert "history: checkpoint True vs config False" in capsys.readouterr().err


def test_a_budgeted_fit_short_of_its_configs_steps_warns(make_config, tiny_phantoms, tmp_path, caplog):
    """A slower machine trains fewer steps in the same max_time: the fit says so, not passes it off."""
    cfg = make_config(tmp_path / "tiny.yaml", tiny_phantoms, tmp_path / "run")
    argv = ["fit", "--config", str(cfg), "--trainer.max_epochs", "500", "--trainer.max_time", "00:00:05:00"]
    argv += [
        "--model.scheduler",
        "cosine",
        "--model.schedule_by",
        "clock",
        "--model.schedule_margin_s",
        "298",
    ]
    with caplog.at_level(logging.WARNING, logger="sautomed"):
        assert main([*argv, "--model.schedule_min_steps", "100000"]) == 0
    (line,) = [r.getMessage() for r in caplog.records if "model.schedule_min_steps" in r.getMessage()]
    assert "fewer than the 100000" in line and "raise trainer.max_time" in line


def test_schedule_settings_a_fit_would_ignore_are_refused(make_config, tiny_phantoms, tmp_path, capsys):
    cfg = make_config(tmp_path / "tiny.yaml", tiny_phantoms, tmp_path / "run")
    base = ["fit", "--config", str(cfg), "--trainer.max_time", "00:00:05:00"]
    assert main([*base, "--model.scheduler", "none", "--model.schedule_by", "clock"]) == 1
    assert "clock needs model.scheduler: cosine (not 'none')" in capsys.readouterr().err
    assert main([*base, "--model.scheduler", "cosine", "--model.schedule_min_steps", "95"]) == 1
    err = capsys.readouterr().err
    assert "schedule_min_steps (95) needs model.schedule_by: clock" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last.ckpt").exists()
