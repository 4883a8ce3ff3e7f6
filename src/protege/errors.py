"""Exception types whose message is meant for the user: the CLI prints them without a traceback.

This module is the floor of the package: it imports nothing from protege, so every layer can raise
`StageError` or subclass `UserError`.
"""

from __future__ import annotations


class UserError(Exception):
    """Marks an error whose message says what to fix (file, line, field, option): no traceback is printed."""


class StageError(UserError, RuntimeError):
    """A stage cannot run as configured (missing input, inconsistent options); the message says why."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)
