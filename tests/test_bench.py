"""`sautomed bench`: the engine encodes each slice once, the naive baseline 3N times, every key is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sautomed.bench import (
    RESULT_KEYS,
    BenchSettings,
    build_net,
    build_parser,
    count_encoded,
    evaluate_targets,
    naive_loop,
    run_bench,
    settings_from_args,
    synthetic_volume,
)
from sautomed.cli import main
from sautomed.inference import InferenceEngine

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone": "tiny", "image_size": 32, "num_classes": 2, "box_decoder_ffn_dim": 64}


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
    assert r["settings"]["backbone"] == "tiny" and r["settings"]["train_batch"] == 1
    assert {"cpu", "torch", "threads"} <= set(r["machine"]) and r["device"] == "cpu" and r["dtype"] == "fp32"
    assert len(r["targets"]) == 3 and all(isinstance(t["ratio"], float) for t in r["targets"])
    printed = capsys.readouterr().out
    assert "encoder_only" in printed and printed.count("PASS") + printed.count("FAIL") == 3


def test_cli_error_exits_non_zero(tmp_path):
    assert main(["bench", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert main(["bench", "--model", "tiny", "--slices", "0"]) == 1


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
