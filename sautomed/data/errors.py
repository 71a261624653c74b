"""The data errors: a volume that cannot be read or written, a dataset that does not fit its layout."""

from __future__ import annotations

from sautomed.errors import UserError


class VolumeError(UserError):
    """A volume cannot be read or written; the message names the file and the problem."""


class DatasetError(UserError):
    """A dataset's files are missing or do not fit its layout; the message names them."""
