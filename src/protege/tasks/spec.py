"""Benchmark tasks: a YAML spec + items, loaded from protege JSONL, AGIEval, BBH or any `datasets` source.

A task reference (what `--tasks` takes) is one of
- a built-in task name (`world_knowledge`, `arithmetic`, `clickbait`, `sql_shop`; see `tasks/builtin/`),
- a path to a task YAML,
- `agieval:FILE.jsonl` or `bbh:FILE.json` (the public formats, with protege's default prompts).

Every source is normalised to one item shape per task type:
    multiple_choice: {"id", "question", "choices": [str], "gold": int, ...}
    generate:        {"id", "question", "answer": str | [str]}
    classify:        {"id", "text", "label"}
    sql:             {"id", "question", "sql"}
Extra fields are kept and may be used in the prompt templates (`{passage}`, `{schema}`, ...).
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ..config import ConfigError, MaxNewTokens, StageConfig, read_yaml, validate_dict
from ..errors import RecordError, StageError
from ..files import jsonl_rows

__all__ = ["TaskSpec", "BUILTIN_DIR", "builtin_tasks", "resolve_task", "load_items", "split_fewshot",
           "format_template", "LETTERS"]

BUILTIN_DIR = Path(__file__).parent / "builtin"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TaskType = Literal["multiple_choice", "generate", "classify", "sql"]


class TaskSpec(StageConfig):
    """One benchmark task. Paths are relative to the YAML file's folder."""

    name: str = Field(..., description="task name used in results and reports")
    type: TaskType = Field(..., description="multiple_choice | generate | classify | sql")
    data: str = Field(..., description="items: a .jsonl/.json file, or hf:DATASET[:CONFIG] for `datasets`")
    format: Literal["protege", "agieval", "bbh", "hf"] = Field("protege", description="how to read `data`")
    split: str = Field("test", description="split of an hf: dataset")
    fields: dict[str, str] = Field(default_factory=dict,
                                   description="rename source fields to protege's (e.g. {question: prompt})")
    description: str = Field("", description="one line saying what the task measures (shown in the report)")
    instruction: str = Field("", description="text before the shots (plain) / system message (chat)")
    template: str | None = Field(None, description="prompt of one item (plain prompting); default per type: "
                                 "'Question: {question}\\nAnswer:', 'Text: {text}\\nLabel:' (classify), "
                                 "'Question: {question}\\nSQL:' (sql)")
    chat_template: str | None = Field(None, description="user message of one item when chat-formatted "
                                      "(default: `template`)")
    target_delimiter: str = Field(" ", description="between the prompt and the answer/option (plain prompting)")
    fewshot_delimiter: str = Field("\n\n", description="between shots (plain prompting)")
    fewshot: int = Field(0, description="number of solved examples shown before each item")
    fewshot_data: str | None = Field(None, description="where shots come from (default: the first `fewshot` "
                                     "items of `data`, which are then not evaluated)")
    choices: Literal["text", "letters"] = Field("text", description="multiple_choice: score the option texts "
                                                "or their letters (A, B, ...)")
    stop: list[str] = Field(default_factory=lambda: ["\n\n"], description="generation stop strings (plain)")
    chat_stop: list[str] = Field(default_factory=list, description="generation stop strings (chat); the "
                                 "model's end-of-turn token always stops")
    max_new_tokens: MaxNewTokens = Field(64, description="generation budget per item")
    answer_regex: list[str] = Field(default_factory=list, description="generate: patterns tried in order; "
                                    "group 1 (or the match) is the answer")
    answer_match: Literal["first", "last"] = Field("last", description="which match of the winning pattern")
    fallback_first_line: bool = Field(True, description="generate: with no regex match, use the first line")
    labels: list[str] = Field(default_factory=list, description="classify: the valid labels")
    database: str | None = Field(None, description="sql: schema + rows as an SQL script (.sql)")

    root: str = Field("", description="(set by the loader) folder that relative paths are resolved against")

    @property
    def item_template(self) -> str:
        if self.template is not None:
            return self.template
        return {"classify": "Text: {text}\nLabel:", "sql": "Question: {question}\nSQL:"}.get(
            self.type, "Question: {question}\nAnswer:")

    def path(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() or not self.root else Path(self.root) / p


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def _agieval_spec(path: str) -> dict[str, Any]:
    return {"name": f"agieval-{Path(path).stem}", "type": "multiple_choice", "data": str(Path(path).resolve()),
            "format": "agieval", "description": "AGIEval multiple choice (exam questions), scored by log-likelihood",
            "template": "{passage}Question: {question}\nAnswer Choices: {options}\nAnswer:",
            "choices": "letters"}


def _bbh_spec(path: str) -> dict[str, Any]:
    return {"name": f"bbh-{Path(path).stem}", "type": "generate", "data": str(Path(path).resolve()),
            "format": "bbh", "description": "Big-Bench Hard, zero-shot greedy exact match",
            "template": "Q: {question}\nA:", "stop": ["\n\n", "\nQ:"], "max_new_tokens": 48,
            "answer_regex": [r"answer is:?\s*(.+?)\.?\s*$"], "answer_match": "last"}


def resolve_task(ref: str, overrides: dict[str, Any] | None = None) -> TaskSpec:
    """A `TaskSpec` from a task reference (see the module docstring)."""
    root = ""
    if ref.startswith("agieval:"):
        data = _agieval_spec(ref.split(":", 1)[1])
    elif ref.startswith("bbh:"):
        data = _bbh_spec(ref.split(":", 1)[1])
    else:
        path = Path(ref)
        if not path.suffix and (BUILTIN_DIR / f"{ref}.yaml").exists():
            path = BUILTIN_DIR / f"{ref}.yaml"
        if not path.exists():
            raise StageError(f"task {ref!r}: not a built-in task ({', '.join(builtin_tasks())}), not a YAML file, "
                             "and not agieval:FILE / bbh:FILE")
        data = read_yaml(path)
        root = str(path.parent.resolve())
        ref = str(path)
    data = {**data, **(overrides or {}), "root": root}
    return validate_dict(TaskSpec, data, where=ref)


# ---- item loading ------------------------------------------------------------------------------

def _read_raw(spec: TaskSpec, data: str) -> list[dict[str, Any]]:
    if data.startswith("hf:"):
        return _read_hf(spec, data[3:])
    path = spec.path(data)
    if not path.exists():
        raise StageError(f"task {spec.name}: data file {path} not found")
    if path.suffix in (".csv", ".parquet", ".arrow"):
        return _read_hf(spec, str(path))
    text = path.read_text(encoding="utf-8")
    if spec.format == "bbh" or path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(f"bad JSON: {err.msg}", str(path), err.lineno) from None
        rows = obj.get("examples") if isinstance(obj, dict) else obj
        if not isinstance(rows, list):
            raise StageError(f"{path}: expected a list of items or {{\"examples\": [...]}} (BBH format)")
        return rows
    rows = []
    for n, row in jsonl_rows(path, text):
        row.setdefault("_line", n)
        rows.append(row)
    return rows


def _read_hf(spec: TaskSpec, source: str) -> list[dict[str, Any]]:
    import datasets

    path = Path(source)
    if path.suffix in (".csv", ".parquet", ".arrow", ".json", ".jsonl"):
        builder = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix, "json")
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    else:
        name, _, cfg = source.partition(":")
        ds = datasets.load_dataset(name, cfg or None, split=spec.split)
    return [dict(r) for r in ds]


def _normalise(spec: TaskSpec, row: dict[str, Any], index: int) -> dict[str, Any]:
    """One raw row -> protege's item shape for this task type (see module docstring)."""
    where = f"task {spec.name}, item {index + 1}" + (f" (line {row['_line']})" if "_line" in row else "")
    item = {k: v for k, v in row.items() if k != "_line"}
    for ours, theirs in spec.fields.items():
        if theirs not in row:
            raise StageError(f"{where}: field `{theirs}` (mapped to `{ours}`) is missing")
        item[ours] = row[theirs]
    if spec.format == "agieval":
        opts = [re.sub(r"^\s*\(?[A-Z]\)\s*", "", o) for o in item.get("options") or []]
        item["choices"] = opts
        item["options"] = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(opts))
        item["passage"] = (item.get("passage") or "").strip() + ("\n" if item.get("passage") else "")
        label = item.get("label")
        if isinstance(label, list):
            label = label[0] if label else None
        if not isinstance(label, str) or label not in LETTERS[:len(opts)]:
            raise StageError(f"{where}: AGIEval `label` must be one of {LETTERS[:len(opts)]!r}, got {label!r}")
        item["gold"] = LETTERS.index(label)
    elif spec.format == "bbh":
        item["question"], item["answer"] = item.get("input"), item.get("target")
    item["id"] = str(item.get("id", f"{spec.name}-{index}"))
    required = {"multiple_choice": ("question", "choices", "gold"), "generate": ("question", "answer"),
                "classify": ("text", "label"), "sql": ("question", "sql")}[spec.type]
    for key in required:
        if item.get(key) is None:
            raise StageError(f"{where}: missing field `{key}` (a {spec.type} item needs {', '.join(required)})")
    if spec.type == "multiple_choice":
        if not isinstance(item["choices"], list) or len(item["choices"]) < 2:
            raise StageError(f"{where}: `choices` must be a list of at least 2 options")
        if isinstance(item["gold"], str) and item["gold"] in item["choices"]:
            item["gold"] = item["choices"].index(item["gold"])
        if not isinstance(item["gold"], int) or not 0 <= item["gold"] < len(item["choices"]):
            raise StageError(f"{where}: `gold` must be an index into `choices` (0..{len(item['choices']) - 1}), "
                             f"got {item['gold']!r}")
        item.setdefault("options", " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(item["choices"])))
    if spec.type == "classify" and spec.labels and item["label"] not in spec.labels:
        raise StageError(f"{where}: label {item['label']!r} is not one of the task's labels {spec.labels}")
    return item


def load_items(spec: TaskSpec, data: str | None = None) -> list[dict[str, Any]]:
    """All items of a task (from `data`, default `spec.data`), validated and normalised."""
    return [_normalise(spec, row, i) for i, row in enumerate(_read_raw(spec, data or spec.data))]


def split_fewshot(spec: TaskSpec, items: list[dict[str, Any]], k: int) -> tuple[list[dict], list[dict]]:
    """(shots, eval_items): shots from `fewshot_data`, else the first k items (then not evaluated)."""
    if k <= 0:
        return [], items
    if spec.fewshot_data:
        return load_items(spec, spec.fewshot_data)[:k], items
    if k >= len(items):
        raise StageError(f"task {spec.name}: {k} shots requested but it has only {len(items)} items")
    return items[:k], items[k:]


class _Strict(string.Formatter):
    def get_value(self, key: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(key, str) and key not in kwargs:
            raise KeyError(key)
        return super().get_value(key, args, kwargs)


def format_template(template: str, item: dict[str, Any], task: str = "") -> str:
    """`template.format(**item)`, with an actionable error for a field the item does not have."""
    try:
        return _Strict().format(template, **item)
    except KeyError as err:
        raise ConfigError(f"task {task}: template uses {{{err.args[0]}}} but items have only "
                          f"{', '.join(sorted(k for k in item))}") from None
