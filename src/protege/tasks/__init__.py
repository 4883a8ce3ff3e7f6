"""Tasks with known answers, one package that training (RL rewards, rejection sampling) and evaluation
(`eval bench`) both read: the spec and loaders in `spec.py`, the built-in tasks in `builtin/`."""

from .spec import (BUILTIN_DIR, LETTERS, TaskSpec, builtin_tasks, format_template, load_items, resolve_task,
                   split_fewshot)

__all__ = ["TaskSpec", "BUILTIN_DIR", "builtin_tasks", "resolve_task", "load_items", "split_fewshot",
           "format_template", "LETTERS"]
