"""The project's own error type: a problem with the user's configuration, data or files that sautomed found.

The command line reports a :class:`UserError` (and an ``OSError``: a missing file, a full disk) in one line
on stderr and exits non-zero; any other exception is a bug and shows its traceback. It is a ``ValueError``,
so code that catches bad values per case (a broken volume in a batch) catches it too.
"""

from __future__ import annotations


class UserError(ValueError):
    """An error caused by the user's input: reported as one line, no traceback."""
