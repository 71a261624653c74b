"""Faults: processes killed with SIGKILL, bad checkpoints, a full disk, half-written files. The kills are real
subprocesses (`python -m sautomed ...`), as a user or a scheduler would cause them."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from robustness_helpers import ROOT, assert_one_line_error, assert_same_grid, cli, kill_when, write_image

from sautomed.cli import main
from sautomed.data import io
from sautomed.data.layouts import get_layout
from sautomed.data.layouts import layout as layout_module
from sautomed.data.phantom import make_phantoms
from sautomed.data.preprocess import Preprocessing, VolumeCache
from sautomed.run_folder import AtomicCheckpointIO


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Weights, optimizer moments and counters bitwise equal."""
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)


# ------------------------------------------------------------------------------------------ fit


@pytest.mark.slow
def test_fit_killed_with_sigkill_resumes_like_an_uninterrupted_run(tiny_phantoms, tmp_path, make_config):
    """kill -9 once the first last.ckpt is on disk; `--ckpt_path last` goes on from it with the optimizer
    state and the data order restored: the final checkpoint equals an uninterrupted run's, bit for bit."""
    two_epochs = [
        "--trainer.max_epochs=2",
        "--trainer.limit_val_batches=0",
        "--data.batch_size=2",  # 2 steps per epoch of 2 windows with 1 warm-up slice: the cheapest real fit
        "--data.windows.samples_per_epoch=4",
        "--data.windows.warmup_max=1",
    ]
    killed = tmp_path / "killed"
    cfg = make_config(tmp_path / "killed.yaml", tiny_phantoms, killed)
    kill_when(["fit", "--config", str(cfg), *two_epochs], lambda: (killed / "last.ckpt").exists())
    at_kill = load(killed / "last.ckpt")  # complete (written atomically) although the process was killed
    assert at_kill["epoch"] == 0 and at_kill["global_step"] == 2

    assert main(["fit", "--config", str(cfg), *two_epochs, "--ckpt_path", "last"]) == 0
    resumed = load(killed / "last.ckpt")
    assert resumed["epoch"] == 1 and resumed["global_step"] == 4  # past the killed step
    (opt,) = resumed["optimizer_states"]
    assert all(float(s["step"]) == 4 for s in opt["state"].values())  # AdamW moments carried on, not reset
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]

    straight = tmp_path / "straight"
    cfg2 = make_config(tmp_path / "straight.yaml", tiny_phantoms, straight)
    assert main(["fit", "--config", str(cfg2), *two_epochs]) == 0
    assert_same_training_state(resumed, load(straight / "last.ckpt"))


def test_resumed_epoch_draws_its_own_batches():
    """On resume Lightning creates the epoch's batch iterator before it calls `set_epoch`: the sampler must
    draw its batches at the first `next()`, or the resumed epoch replays epoch 0's data order."""
    from sautomed.data.datamodule import WindowBatchSampler

    sampler = WindowBatchSampler(8, 4, (1, 3), seed=0)
    iterator = iter(sampler)  # what Lightning does while restoring the fit loop
    sampler.sampler.set_epoch(1)
    reference = WindowBatchSampler(8, 4, (1, 3), seed=0)
    reference.sampler.set_epoch(1)
    batches = list(iterator)
    assert batches == list(reference) and all(key[0] == 1 for batch in batches for key in batch)


def test_cli_errors_in_a_real_process_are_one_line(trained_run, tiny_phantoms, tmp_path, make_config):
    """`fit --ckpt_path last` with nothing to resume, and predict with a truncated checkpoint: non-zero exit,
    one line on stderr, no traceback, nothing started (the two processes run side by side)."""
    _, run = trained_run
    empty = tmp_path / "empty run"
    cfg = make_config(tmp_path / "c.yaml", tiny_phantoms, empty)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((run / "last.ckpt").read_bytes()[:100_000])
    src = next((tiny_phantoms / "test" / "imagesTr").iterdir())
    commands = [
        cli("fit", "--config", str(cfg), "--ckpt_path", "last"),
        cli("predict", "--ckpt_path", str(truncated), "--input", str(src), "--output", str(tmp_path / "o")),
    ]
    procs = [
        subprocess.Popen(
            c,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        for c in commands
    ]
    (out1, err1), (out2, err2) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 1 and procs[1].returncode == 1
    line = assert_one_line_error(err1)
    assert f"there is no {empty / 'last.ckpt'} to resume from" in line and "fresh run" in line
    assert not empty.exists()  # no fresh run was started
    line = assert_one_line_error(err2)
    assert str(truncated) in line and "truncated or corrupt" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_bad_checkpoints_are_refused_before_anything_runs(trained_run, tmp_path, capsys, command):
    cfg, run = trained_run
    bad = {
        "truncated.ckpt": (run / "last.ckpt").read_bytes()[:5000],
        "garbage.ckpt": b"this is not a checkpoint\n",
        "empty.ckpt": b"",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")  # a Lightning checkpoint of something else
    expected = {
        "truncated.ckpt": "truncated or corrupt",
        "garbage.ckpt": "truncated or corrupt",
        "empty.ckpt": "truncated or corrupt",
        "foreign.ckpt": "not a sautomed checkpoint",
        "missing.ckpt": "checkpoint not found",
    }
    for name, reason in expected.items():
        argv = [command, "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "r")]
        assert main([*argv, "--ckpt_path", str(tmp_path / name)]) == 1, name
        line = assert_one_line_error(
            capsys.readouterr().err
        )  # the only line: refused before Lightning starts
        assert str(tmp_path / name) in line and reason in line, line
    argv = [command, "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "r")]
    assert main([*argv, "--ckpt_path", "best"]) == 1
    line = assert_one_line_error(capsys.readouterr().err)
    assert (
        "not supported by fit" if command == "fit" else f"there is no {tmp_path / 'r' / 'best.ckpt'}"
    ) in line
    assert not (tmp_path / "r").exists()


# -------------------------------------------------------------------------------------- predict


def test_predict_killed_halfway_then_rerun_finishes(trained_run, tmp_path, capsys):
    """kill -9 once the first output appears: every output on disk is complete, a rerun writes the rest
    (keeping what is there, removing a partial file a killed writer left), and a fresh process predicts
    bit for bit what the killed one did."""
    _, run = trained_run
    inp, out = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(0)
    names = [f"case_{k}.nii.gz" for k in range(8)]
    for k, name in enumerate(names):
        write_image(inp / name, rng.integers(-200, 300, (4, 24, 20)).astype(np.int16), origin=(k, 0.0, 0.0))
    argv = [
        "predict",
        "--ckpt_path",
        str(run / "best.ckpt"),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--no-progress",
    ]

    def outputs() -> list[Path]:
        if not out.is_dir():  # label maps only (labels.json beside them names the classes)
            return []
        return sorted(p for p in out.iterdir() if not p.name.startswith(".") and p.name.endswith(".nii.gz"))

    kill_when(argv, lambda: bool(outputs()))
    done = outputs()
    assert 1 <= len(done) < len(names), "the kill came too late to interrupt anything"
    for path in done:  # nothing torn: each file on disk is a complete label map on its input's grid
        assert_same_grid(path, sitk.ReadImage(str(inp / path.name)))
    before = {p.name: p.read_bytes() for p in done}
    # what a kill during a write leaves: a hidden partial file named after the output and the dead writer
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    partial = out / f".case_7.tmp-{int(gone.stdout)}-0123abcd.nii.gz"
    partial.write_bytes(b"\x1f\x8b half")

    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"removed {partial}" in err and not partial.exists()
    assert err.count("kept existing") == len(done)
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "labels.json"])  # nothing else
    for path in outputs():
        assert_same_grid(path, sitk.ReadImage(str(inp / path.name)))
    assert {p.name: p.read_bytes() for p in done} == before  # kept as they were

    again = tmp_path / "again"
    single = ["predict", "--ckpt_path", str(run / "best.ckpt"), "--input", str(inp / done[0].name)]
    assert main([*single, "--output", str(again), "--no-progress"]) == 0
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(done[0])))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(again / done[0].name))), first)


def test_stale_temporaries_of_live_writers_are_left_alone(tmp_path):
    out = tmp_path / "a.nii.gz"
    mine = tmp_path / f".a.tmp-{os.getpid()}-0123abcd.nii.gz"
    mine.write_bytes(b"in progress")
    other = tmp_path / ".b.tmp-1-0123abcd.nii.gz"  # another output's
    other.write_bytes(b"x")
    assert io.stale_temporaries(out) == []  # this process is alive
    assert io.pid_alive(os.getpid()) and not io.pid_alive(2**22 + 12345)


# ----------------------------------------------------------------------------------- full disk


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    # partial files of earlier saves: one of a writer killed mid-save (removed), one of a live writer (kept)
    dead = tmp_path / ".last.ckpt.4194999.abcd_123.tmp"  # above Linux's largest pid: never running
    live = tmp_path / f".last.ckpt.{os.getpid()}.abcd_123.tmp"
    dead.write_bytes(b"PK half")
    live.write_bytes(b"PK half")
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    assert not dead.exists() and live.exists()
    live.unlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # as a plain open() would make it
    before = target.read_bytes()

    def no_space(obj, f, *args, **kwargs):
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError) as info:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    def no_space(image, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io.sitk, "WriteImage", no_space)
    assert main(["phantoms", "--out", str(tmp_path / "ph"), "--cases", "1"]) == 1
    line = assert_one_line_error(capsys.readouterr().err)
    assert "No space left on device" in line
    assert [p for p in (tmp_path / "ph").rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------------------------------- cache


def test_a_half_written_cache_file_is_never_read(tmp_path, monkeypatch):
    data = make_phantoms(tmp_path / "ds", 1, seed=3, size=(4, 16, 16))
    layout = get_layout("nnunet", data)
    (case,) = layout.cases()
    p = Preprocessing(image_size=16)
    cache = VolumeCache(tmp_path / "cache")
    path = cache.path(layout, case, p)
    reads = []
    real_read = layout_module.read_volume
    monkeypatch.setattr(layout_module, "read_volume", lambda f: reads.append(f) or real_read(f))

    # a writer that dies half way: nothing at the cache path, no temporary left, the error surfaces
    real_open = open

    def dying_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and ".tmp-" in str(file):
            handle.write(b"PK\x03\x04 half")
            handle.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return handle

    monkeypatch.setattr("builtins.open", dying_open)
    with pytest.raises(OSError):
        cache.get(layout, case, p)
    monkeypatch.setattr("builtins.open", real_open)
    assert not path.exists() and list((tmp_path / "cache").iterdir()) == []

    # a partial file left by a killed writer sits beside the cache path: it is never taken for the entry
    partial = path.with_name(f".{path.stem}.tmp-999999-0123abcd.npz")
    partial.write_bytes(b"PK\x03\x04 half")
    first = cache.get(layout, case, p)
    assert len(reads) == 2 and path.is_file()
    second = cache.get(layout, case, p)
    assert len(reads) == 2 and np.array_equal(first.image, second.image)  # the complete entry is used
    # and a torn file at the cache path itself (e.g. a disk fault) is recomputed, never used
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unusable cache file"):
        third = cache.get(layout, case, p)
    assert len(reads) == 3 and np.array_equal(first.image, third.image)
