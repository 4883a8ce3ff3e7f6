"""Exception types whose message is meant for the user: the CLI prints them without a traceback.

This module is the floor of the package: it imports nothing from protege, so every layer can raise
`StageError` or subclass `UserError`.
"""

from __future__ import annotations


class UserError(Exception):
    """Marks an error whose message says what to fix (file, line, field, option): no traceback is printed."""


class StageError(UserError, RuntimeError):
    """A stage cannot run as configured (missing input, inconsistent options); the message says why."""


class RecordError(UserError, ValueError):
    """A record or line of a data file that does not fit its schema. `str()` is `file:line: problem` when known."""

    def __init__(self, problem: str, path: str | None = None, line: int | None = None):
        self.problem = problem
        self.path = path
        self.line = line
        where = f"{path}:{line}: " if path is not None and line is not None else ""
        super().__init__(f"{where}{problem}")


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)
