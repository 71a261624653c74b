"""Helpers of the robustness tests: volumes with a chosen grid, the CLI as a real subprocess, grid checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]


def rotation(axis: int, degrees: float) -> np.ndarray:
    """A 3 x 3 rotation about physical axis ``axis`` (0 x, 1 y, 2 z)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def write_image(
    path: Path,
    stored: np.ndarray,
    spacing: Sequence[float] = (0.8, 0.9, 2.5),
    origin: Sequence[float] = (10.0, -20.0, 30.0),
    direction: Sequence[float] | np.ndarray = (1, 0, 0, 0, 1, 0, 0, 0, 1),
) -> Path:
    """Write ``stored`` (numpy order, as GetArrayFromImage returns it) with the given grid."""
    image = sitk.GetImageFromArray(stored)
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in np.asarray(direction, dtype=float).ravel()])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def assert_same_grid(output: Path, source: sitk.Image) -> None:
    """``output`` lies exactly on ``source``'s grid: size, spacing, origin, direction, voxel order."""
    out = sitk.ReadImage(str(output))
    assert out.GetDimension() == 3 and out.GetPixelID() == sitk.sitkUInt8, output
    assert out.GetSize() == source.GetSize(), output
    assert out.GetSpacing() == source.GetSpacing(), output
    assert out.GetOrigin() == source.GetOrigin(), output
    np.testing.assert_allclose(
        out.GetDirection(), source.GetDirection(), rtol=0, atol=1e-6, err_msg=str(output)
    )


def cli(*args: str) -> list[str]:
    """The command line of a real `sautomed` process (run from the project root)."""
    return [sys.executable, "-m", "sautomed", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `sautomed ARGS` to completion in a subprocess; stdout and stderr captured as text."""
    return subprocess.run(
        cli(*args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        env=_env(),
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SAUTOMED_DEBUG", None)  # user errors must be one line, not re-raised
    return env


def kill_when(
    args: Sequence[str], ready: Callable[[], bool], timeout: float = 300, poll: float = 0.02
) -> subprocess.Popen:
    """Start `sautomed ARGS`, wait until ``ready()`` and SIGKILL it at once; returns the reaped process.

    Fails the test when the process ends on its own before ``ready()`` (then nothing was interrupted).
    """
    proc = subprocess.Popen(
        cli(*args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=_env(),
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                pytest.fail(
                    f"the process ended (rc {proc.returncode}) before it could be killed:\n{out[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("timed out waiting for the point to kill the process at")
            time.sleep(poll)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return proc


def assert_one_line_error(stderr: str) -> str:
    """A user error: no traceback, exactly one line on stderr, `sautomed: error: ...`; returns it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sautomed: error: "), stderr
    return lines[0]
