"""The data errors: a volume that cannot be read or written, a dataset that does not fit its layout."""

from __future__ import annotations


class VolumeError(ValueError):
    """A volume cannot be read or written; the message names the file and the problem."""


class DatasetError(ValueError):
    """A dataset's files are missing or do not fit its layout; the message names them."""
