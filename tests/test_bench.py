"""`sautomed bench`: the engine encodes each slice once, the naive baseline 3N times, every key is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sautomed.bench import (
    BACKBONE_KEYS,
    RESULT_KEYS,
    BenchSettings,
    build_net,
    build_parser,
    count_encoded,
    evaluate_targets,
    format_report,
    naive_loop,
    run_bench,
    settings_from_args,
    supervised_slices,
    synthetic_volume,
)
from sautomed.cli import main
from sautomed.models.sautomed.inference import InferenceEngine

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone": "tiny", "image_size": 32, "num_classes": 2, "box_decoder_ffn_dim": 64}
# litemedsam without weights (the bench builds inside weights_from_elsewhere), frozen: its features cache
LITE = {**TINY, "backbone": "litemedsam", "encoder_finetune": "frozen", "lora_rank": 0}


@pytest.mark.parametrize("z", [1, 6])
def test_engine_encodes_each_slice_once_and_the_naive_loop_three_times(z):
    net = build_net(BenchSettings(network=TINY)).eval()
    volume = synthetic_volume(z, 32)
    engine = InferenceEngine(net, "mid_to_ends", encode_chunk=3)
    with count_encoded(net) as calls:
        engine.segment(volume, (40, 40))
    assert sum(calls) == z and len(calls) == math.ceil(z / 3)
    with count_encoded(net) as calls:
        naive = naive_loop(net, volume, (40, 40))
    assert calls == [3] * z  # t-1, t, t+1 for every slice (edges repeated)
    assert "encode" not in net.__dict__  # the counter leaves the class method in place
    # the naive loop computes what end_to_end computes, only with 3x the encoder work
    e2e = InferenceEngine(net, "end_to_end", encode_chunk=3).segment(volume, (40, 40))
    assert naive.shape == e2e.shape == (z, 40, 40)
    assert (naive == e2e).float().mean() > 0.99


def test_config_defaults_and_flag_overrides():
    args = ["--config", str(ROOT / "configs" / "btcv.yaml")]
    s = settings_from_args(build_parser().parse_args(args))
    assert s.network["backbone"] == "vit_b" and s.network["image_size"] == 1024
    assert s.network["num_classes"] == 8 and s.train_batch == 8 and s.warmup_slices == 3
    assert "sam_checkpoint" not in s.network and s.dtype == "fp32"
    args += ["--model", "tiny", "--image-size", "64", "--classes", "3", "--train-batch", "2"]
    s = settings_from_args(build_parser().parse_args(args))
    assert (s.network["backbone"], s.network["image_size"], s.network["num_classes"]) == ("tiny", 64, 3)
    assert s.train_batch == 2 and s.network["grad_checkpointing"] is True  # the config's, kept


def test_targets_pass_and_fail():
    r = {
        "volume_mid_to_ends_s": 1.1,
        "encoder_only_s": 1.0,
        "naive_loop_s": 3.0,
        "propagation_mid_to_ends_s": 0.7,
        "propagation_end_to_end_s": 1.0,
    }
    assert [t["pass"] for t in evaluate_targets(r)] == [True, True, False]
    r["naive_loop_s"] = None
    assert evaluate_targets(r)[1]["pass"] is None


def test_resume_keeps_finished_measures_and_runs_the_rest():
    s = BenchSettings(network=TINY, slices=3, out_size=32, repeats=1, warmup=0, naive=False, train=False)
    first = run_bench(s)
    assert first["resumed"] == [] and first["encoded_slices_engine"] == 3
    interrupted = {k: v for k, v in first.items() if not k.startswith("volume_end_to_end")}
    again = run_bench(s, resume=interrupted)
    assert "encoder_only" in again["resumed"] and "volume_end_to_end" not in again["resumed"]
    assert again["encoder_only_s"] == first["encoder_only_s"] and again["volume_end_to_end_s"] > 0
    with pytest.raises(ValueError, match="other settings"):
        run_bench(BenchSettings(**{**s.__dict__, "slices": 4}), resume=interrupted)


def test_threads_hold_for_the_run_only():
    """`--threads` must not leak: a caller (a notebook, the test session) keeps its own thread count."""
    s = BenchSettings(
        network=TINY, slices=2, out_size=32, repeats=1, warmup=0, naive=False, train=False, threads=1
    )
    caller = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert run_bench(s)["threads"] == 1
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(caller)


def test_cli_writes_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "--image-size",
            "64",
            "--slices",
            "5",
            "--classes",
            "3",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--train-batch",
            "1",
            "--warmup-slices",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    r = json.loads(out.read_text())
    for key in RESULT_KEYS:
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["encoded_slices_engine"] == 5 and r["encoded_slices_naive"] == 15
    assert r["complete"] is True and r["resumed"] == []
    assert list(r["backbones"]) == ["tiny"]
    for key in BACKBONE_KEYS:
        assert r["backbones"]["tiny"][key] == r[key], key
    assert r["settings"]["backbone"] == "tiny" and r["settings"]["train_batch"] == 1
    assert {"cpu", "torch", "threads"} <= set(r["machine"]) and r["device"] == "cpu" and r["dtype"] == "fp32"
    assert len(r["targets"]) == 3 and all(isinstance(t["ratio"], float) for t in r["targets"])
    printed = capsys.readouterr().out
    assert "encoder_only" in printed and printed.count("PASS") + printed.count("FAIL") == 3


def test_cli_error_exits_non_zero(tmp_path):
    assert main(["bench", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert main(["bench", "--model", "tiny", "--slices", "0"]) == 1


def test_a_config_of_another_family_is_refused_in_one_line(capsys):
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name, family in (("msam_brats.yaml", "msam"), ("unet3d_chaos_mr_small.yaml", "baseline")):
        assert main(["bench", "--config", str(configs / name), "--no-train"]) == 1
        err = capsys.readouterr().err
        assert f"a {family} config" in err and len(err.strip().splitlines()) == 1


def test_a_training_step_that_does_not_fit_is_recorded_and_the_bench_goes_on(monkeypatch):
    import sautomed.bench as bench
    from sautomed.bench import worker as bench_worker

    def worker(s, checkpointed, timing):
        if not checkpointed:  # as when the kernel kills the worker for memory
            raise RuntimeError("training-step worker failed (-9) (killed: out of memory?): ")
        return {"peak_mb": 123.0, "step_mb": 100.0, "first_step_s": 0.5, "memory_method": "VmHWM"}

    monkeypatch.setattr(bench_worker, "run_train_worker", worker)
    s = BenchSettings(network=TINY, slices=3, out_size=32, repeats=1, warmup=0, naive=False, train=True)
    r = run_bench(s)
    assert r["train_step_s"] is None and "out of memory" in r["train_error"]
    assert r["train_peak_mb_checkpointed"] == 123.0 and r["train_first_step_s_checkpointed"] == 0.5
    assert r["encoder_only_s"] > 0 and len(r["targets"]) == 3
    report = bench.format_report(r)
    assert "FAILED" in report and "checkpointed" in report
    again = run_bench(s, resume=r)  # a resumed run keeps the failure instead of running it again
    assert "train" in again["resumed"] and again["train_error"] == r["train_error"]


def test_every_network_backbone_is_a_bench_model():
    import typing

    from sautomed.bench import BACKBONES
    from sautomed.models.sautomed.network import NetworkConfig

    assert BACKBONES == typing.get_args(typing.get_type_hints(NetworkConfig)["backbone"])
    assert "--model" in build_parser().format_help() and "tiny" in BACKBONES


def test_supervised_slices_per_window_and_the_chains():
    from sautomed.bench.chain import StepKind, chain_rate, chains, step_kinds

    assert supervised_slices(6, 1.0) == 7 and supervised_slices(3, 0.5) == 4  # every step carries a loss
    assert supervised_slices(6, 0.0) == 1 and supervised_slices(1, 0.0) == 1  # the target alone
    s = BenchSettings(
        network=LITE, train_batch=2, warmup_slices=4, warmup_min=2, feature_cache=True, loss={"warmup": 1.0}
    )
    before, after = chains(s, cached=True)
    assert (before.warmups, before.warmup_loss, before.cached) == ((1, 3), 0.0, False)
    assert (after.warmups, after.warmup_loss, after.cached) == ((2, 4), 1.0, True)
    kinds = step_kinds(s, encoder_frozen=True)
    assert len(kinds) == len({k.key for k in kinds}) == 1 + 1 + 3 + 2  # config (= after n=4), its other path
    assert StepKind(4, 1.0, False) in kinds and StepKind(4, 1.0, True) == kinds[0]
    assert all(not k.cached for k in step_kinds(s, encoder_frozen=False))  # a training encoder: no cache
    steps = {k.key: 0.5 * k.warmups for k in kinds}
    rate = chain_rate(after, 2, steps)  # n = 2, 3, 4: mean 4 slices per window, mean step 1.5 s
    assert rate["supervised_slices_per_window"] == 4 and rate["supervised_slices_per_step"] == 8
    assert rate["supervised_slices_per_s"] == pytest.approx(8 / 1.5)
    assert chain_rate(before, 2, steps)["supervised_slices_per_step"] == 2  # 1 per window, batch 2


def test_the_cached_step_runs_no_encoder_and_the_encoded_step_does():
    from sautomed.bench.chain import StepKind
    from sautomed.bench.worker import _Trainer

    s = BenchSettings(network=LITE, train_batch=2, warmup_slices=2, feature_cache=True, loss={"warmup": 1.0})
    trainer = _Trainer(s, checkpointed=False, warmup_loss=1.0)
    assert trainer.encoder_frozen
    cached, encoded = StepKind(2, 1.0, True), StepKind(2, 1.0, False)
    trainer.batch(cached)  # fills the cache: 2 windows x 5 distinct slices
    assert len(trainer.module._feature_cache) == 2 * 5
    with count_encoded(trainer.module.net) as calls:
        trainer.step(cached)
    assert calls == []  # features from the cache: only the decoder chain runs
    with count_encoded(trainer.module.net) as calls:
        trainer.step(encoded)
    assert sum(calls) == 2 * 5  # every slice of both windows encoded once


def test_litemedsam_beside_tiny_in_one_run():
    s = BenchSettings(
        network=LITE,
        slices=3,
        out_size=32,
        repeats=1,
        warmup=0,
        naive=False,
        train_batch=2,
        warmup_slices=3,
        warmup_min=1,
        feature_cache=True,
        before_warmups=(1, 2),
        loss={"warmup": 1.0},
        compare=("tiny",),
        case_slices=4,
        threads=1,
        sam_refine=True,
    )
    r = run_bench(s)
    assert list(r["backbones"]) == ["litemedsam", "tiny"]
    assert r["refine_case_s"] > 0 and r["backbones"]["litemedsam"]["refine_case_s"] == r["refine_case_s"]
    assert "refine_case_s" not in r["backbones"]["tiny"]  # LiteMedSAM's own pass: the litemedsam model only
    for name, b in r["backbones"].items():
        for key in BACKBONE_KEYS:
            assert isinstance(b[key], float) and b[key] > 0, (name, key)
        assert b["train_error"] is None and b["train_feature_cache"] is True  # frozen, augmented copies
        assert b["train_step_s"] == b["train_step_cached_s"] and b["train_step_uncached_s"] > 0
        assert b["train_supervised_slices_per_window"] == 3 + 1  # the warm-up loss: n + 1
        assert b["train_supervised_slices_per_step"] == 2 * 4
        assert b["train_supervised_slices_per_s"] == pytest.approx(8 / b["train_step_s"])
        before, after = b["train_chain_before"], b["train_chain_after"]
        assert before["supervised_slices_per_window"] == 1 and set(before["step_s"]) == {"1", "2"}
        assert not before["feature_cache"] and after["feature_cache"] and after["warmups"] == [1, 3]
        assert after["supervised_slices_per_window"] == pytest.approx((2 + 3 + 4) / 3)
        assert after["step_s"]["3"] == b["train_step_s"]  # the config's step is the chain's n = 3 step
    for key in set(RESULT_KEYS) - {"naive_loop_s"}:  # --no-naive
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["predict_case_s"] == r["backbones"]["litemedsam"]["predict_case_s"]
    report = format_report(r)
    assert "litemedsam" in report and "tiny" in report and "before: warm-ups 1..2" in report
    assert "+ inference.sam_refine, worst case" in report


def test_compare_and_chain_flags():
    import yaml

    config = ROOT / "configs" / "chaos_mr_litemedsam.yaml"
    cfg = yaml.safe_load(config.read_text())
    windows = cfg["data"]["windows"]
    s = settings_from_args(build_parser().parse_args(["--config", str(config), "--compare", "tiny"]))
    assert s.network["backbone"] == "litemedsam" and s.compare == ("tiny",)
    assert s.feature_cache == (windows.get("augmented_copies", 0) > 0)
    assert (s.warmup_min, s.warmup_slices) == (windows.get("warmup_min", 1), windows["warmup_max"])
    assert s.loss["warmup"] == cfg["model"]["loss"]["warmup"]
    assert s.before_warmups == (1, 3) and s.case_slices == 35 and s.mode == "mid_to_ends"
    assert s.sam_refine == cfg["model"]["inference"]["sam_refine"] and s.sam_refine_margin == 6
    s = settings_from_args(build_parser().parse_args(["--model", "tiny", "--compare", "litemedsam,tiny"]))
    assert s.compare == ("litemedsam",)  # the model itself is not compared with itself
    with pytest.raises(ValueError, match="unknown backbone"):
        settings_from_args(build_parser().parse_args(["--compare", "nope"]))
    with pytest.raises(ValueError, match="before-warmups"):
        settings_from_args(build_parser().parse_args(["--before-warmups", "3,1"]))
