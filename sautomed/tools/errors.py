"""The errors one bad case can raise while it is read or written, so a batch reports it and goes on.

`zlib.error` is listed because a corrupt ``.nii.gz`` can raise it from the gzip reader (it is neither an
OSError nor a ValueError); SimpleITK raises RuntimeError.
"""

from __future__ import annotations

import zlib

from sautomed.data.io import VolumeError
from sautomed.data.layouts import DatasetError

CASE_ERRORS: tuple[type[BaseException], ...] = (
    VolumeError,
    DatasetError,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    zlib.error,
)


def naming(exc: BaseException, path: object) -> str:
    """The error as one line that names ``path`` (prefixed when the message does not already)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if str(path) in text else f"{path}: {text}"
