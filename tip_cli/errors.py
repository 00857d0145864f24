"""Faults that are the user's to fix, told apart from bugs in tip.

A `UserError` is a fault in what the user gave tip or in their environment: a config value, a data file, a run dir,
a checkpoint, the disk, a server. Its message says what was wrong, what was expected and what to try; the CLI prints
it in one line and exits 2. Any other exception is a bug and keeps its traceback (exit 1). Each subclass also keeps
the builtin base its callers catch (ValueError, OSError, ConnectionError), so `except ValueError` still sees it.
"""

from __future__ import annotations


class UserError(Exception):
    """A fault the user can fix; the message is one line that says how."""


class DataError(UserError, ValueError):
    """A dataset, file or row that cannot be used as given: unreadable, malformed, or too long for the context."""


class ModelError(UserError, ValueError):
    """A model that cannot be used as given: its next-token distributions are not finite (NaN or inf weights)."""
