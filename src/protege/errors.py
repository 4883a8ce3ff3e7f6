"""Exception types whose message is meant for the user: the CLI prints them without a traceback."""

from __future__ import annotations

from .chat import ChatTemplateError
from .config import ConfigError
from .models import ModelError
from .records import RecordError


class StageError(RuntimeError):
    """A stage cannot run as configured (missing input, inconsistent options); the message says why."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, RecordError, ModelError, ChatTemplateError, StageError, FileNotFoundError,
)
