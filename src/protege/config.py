"""Strict, typed stage configs: YAML file < `--dotted.key=value` overrides.

Every stage declares its options as a pydantic model subclassing `StageConfig`
(one `description=` per field, a sensible default). `load_config` merges a YAML
file with command-line overrides and validates the result. Mistakes are
`ConfigError`s that name the file, the key, and what was expected, e.g.

    recipe.yaml: unknown key `train.learnin_rate` — did you mean `learning_rate`?
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError

__all__ = [
    "deep_merge",
    "Sampling",
    "sampling_field",
    "move_flat_keys",
    "Temperature",
    "TopP",
    "MaxNewTokens",
    "TopK",
    "StageConfig",
    "ConfigError",
    "load_config",
    "parse_overrides",
    "save_config",
    "config_help",
    "validate_dict",
]

# How every config that samples declares it: the bounds live here once; each field gives its default and
# what the value is for (`temperature: Temperature = Field(0.7, description="...")`).
Temperature = Annotated[float, Field(ge=0.0)]  # 0 = greedy
TopP = Annotated[float, Field(gt=0.0, le=1.0)]  # 1 = off
MaxNewTokens = Annotated[int, Field(ge=1)]
TopK = Annotated[int, Field(ge=0)]  # 0 = off


class ConfigError(UserError, ValueError):
    """A config problem the user can fix; the message says where and how."""


class StageConfig(BaseModel):
    """Base for every stage config: unknown keys are errors, assignments are validated.

    Keys that moved into a nested group are still accepted in their old flat spelling and moved in:
    a field typed `Sampling` takes `max_new_tokens` / `temperature` / `top_p` given beside it, and
    `moved_keys` names any other move (`{"answer_temperature": "answer_sampling.temperature"}`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    moved_keys: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _move_flat_keys(cls, data: Any) -> Any:
        return move_flat_keys(cls, data)


class Sampling(StageConfig):
    """How a stage samples replies, declared once; every config that samples nests one (`sampling:`)."""

    max_new_tokens: MaxNewTokens = Field(256, description="token budget per reply")
    temperature: Temperature = Field(0.0, description="0 = greedy (reproducible)")
    top_p: TopP = Field(1.0, description="nucleus sampling (1 = off)")


def sampling_field(description: str, **defaults: Any) -> Any:
    """A config field holding a `Sampling` with this stage's defaults."""
    return Field(default_factory=lambda: Sampling(**defaults), description=description)


def move_flat_keys(cls: type[BaseModel], data: Any) -> Any:
    """`data` with old flat keys moved into their nested groups (see `StageConfig`).

    A key given both ways is an error."""
    if not isinstance(data, dict):
        return data
    fields = _model_fields(cls)
    moves = _moves(cls)
    # A partly given group keeps this stage's defaults for the rest (`sampling: {top_p: 0.9}` keeps the
    # stage's temperature), not the group class's.
    partial = [name for name in _sampling_groups(cls)
               if isinstance(data.get(name), dict) and set(data[name]) < set(Sampling.model_fields)]
    flat = [k for k in data if k in moves and k not in fields]
    if not flat and not partial:
        return data
    original = data
    data = dict(data)
    for name in partial:
        default = fields[name].get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            data[name] = {**default.model_dump(), **data[name]}
    for key in flat:
        group, sub = moves[key].split(".", 1)
        given = original.get(group)
        if isinstance(given, BaseModel):
            given = given.model_dump()
        if isinstance(given, dict) and sub in given:
            raise ConfigError(f"`{key}` and `{group}.{sub}` are the same setting, given twice; keep `{group}.{sub}`")
        if group not in data or data[group] is None:  # start from this stage's defaults, not the group class's
            default = fields[group].get_default(call_default_factory=True)
            data[group] = default.model_dump() if isinstance(default, BaseModel) else {}
        elif isinstance(data[group], BaseModel):
            data[group] = data[group].model_dump()
        else:
            data[group] = dict(data[group])
        data[group][sub] = data.pop(key)
    return data


C = TypeVar("C", bound=StageConfig)


def _model_fields(cls: type[BaseModel]) -> dict[str, Any]:
    return dict(cls.model_fields)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class behind a field annotation (`Sub`, `Sub | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _sampling_groups(cls: type[BaseModel]) -> list[str]:
    """The fields of `cls` that hold a `Sampling`."""
    return [name for name, f in _model_fields(cls).items() if _nested_model(f.annotation) is Sampling]


def _moves(cls: type[BaseModel]) -> dict[str, str]:
    """Old flat key -> its place in a nested group (`moved_keys`, then each `Sampling` group's own keys)."""
    fields = _model_fields(cls)
    moves = dict(getattr(cls, "moved_keys", {}))
    for name in _sampling_groups(cls):
        moves.update({k: f"{name}.{k}" for k in Sampling.model_fields if k not in fields and k not in moves})
    return moves


def _check_keys(cls: type[BaseModel], data: Any, where: str, prefix: str = "") -> None:
    """Raise on the first unknown key, with the closest valid key as a hint.

    pydantic reports `extra_forbidden` too, but without a suggestion and after
    type errors of other fields; users mistype keys far more often than types.
    """
    if not isinstance(data, dict):
        return
    data = move_flat_keys(cls, data)
    fields = _model_fields(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields) + list(_moves(cls)), n=1, cutoff=0.5)
            hint = f" — did you mean `{close[0]}`?" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown key `{dotted}`{hint} (valid keys: {valid})")
        sub = _nested_model(fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            _check_keys(sub, value, where, prefix=f"{dotted}.")


def _format_validation_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        got = e.get("input")
        got_s = repr(got) if not isinstance(got, dict) else "a mapping"
        lines.append(f"{where}: `{loc}`: {e['msg']} (got {got_s})")
    return "\n".join(lines)


def validate_dict(cls: type[C], data: dict[str, Any], where: str = "<config>") -> C:
    """Validate a plain dict against `cls`, raising `ConfigError` with readable messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    _check_keys(cls, data, where)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, where)) from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--a.b=3", "--c", "[1,2]", "--flag"]` -> `{"a": {"b": 3}, "c": [1, 2], "flag": True}`.

    Values are parsed as YAML scalars. `--key value` works as well as `--key=value` (what `--help`
    shows and what argparse users type); a bare `--key` before another option or at the end is `true`.
    """
    out: dict[str, Any] = {}
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        text = arg[2:] if arg.startswith("--") else arg
        if "=" not in text:
            if not arg.startswith("--"):
                raise ConfigError(f"override `{arg}`: expected KEY=VALUE, e.g. --train.learning_rate=1e-4")
            if i < len(args) and not args[i].startswith("--"):
                text, i = f"{text}={args[i]}", i + 1
            else:
                text = f"{text}=true"
        key, raw = text.split("=", 1)
        try:
            value = safe_yaml(raw, f"override `{arg}`") if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            # YAML 1.1 reads yes/no/on/off as booleans: `--out_dir=off` must stay a folder name and
            # `--resume=no` a choice; a boolean field still takes "yes"/"off" (pydantic parses them).
            value = raw.strip()
        _set_dotted(out, key.strip().replace("-", "_"), value)
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, nested mappings merged key by key (inputs unchanged).

    A list is reached by index: `--set curate.steps.4.max_tokens=2048` changes one key of the fifth step."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(value, dict) and isinstance(merged.get(key), list) and value and all(
                isinstance(k, str) and k.isdigit() for k in value):
            items = list(merged[key])
            for index, sub in value.items():
                i = int(index)
                if i >= len(items):
                    raise ConfigError(f"`{key}.{index}`: `{key}` has {len(items)} items (indexes 0-{len(items) - 1})")
                items[i] = deep_merge(items[i], sub) if isinstance(items[i], dict) and isinstance(sub, dict) else sub
            merged[key] = items
        else:
            merged[key] = value
    return merged


# A YAML file is a tree once its aliases are expanded, and every consumer (validation, JSON dumps, merges)
# expands them: a few lines of nested aliases ("billion laughs") would take all memory there. Refuse a
# document whose expanded tree is larger than this many values; real configs and data files have thousands.
YAML_MAX_VALUES = 1_000_000


def safe_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load` that refuses an alias bomb or a self-referencing alias (ConfigError naming `where`)."""
    data = yaml.safe_load(text)
    if "*" in text:  # only documents with aliases can share (or loop) structure
        count, stack = 0, [data]
        while stack:
            node = stack.pop()
            count += 1
            if count > YAML_MAX_VALUES:
                raise ConfigError(f"{where}: YAML aliases expand to more than {YAML_MAX_VALUES:,} values "
                                  "(an alias bomb, or an alias that refers to itself)")
            if isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning syntax errors into `ConfigError(file:line: ...)`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = safe_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> C:
    """Build a `cls` from defaults < YAML file at `path` < `overrides`."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    where = str(path) if path else "<defaults>"
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        _check_keys(cls, extra, "command line")
        data = deep_merge(data, extra)
        where = f"{where} + command line" if path else "command line"
    return validate_dict(cls, data, where)


def save_config(config: BaseModel, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a stage's outputs."""
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return out


def config_help(cls: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> str:
    """One line per field: `key (type, default): description` — used in `--help`.

    A nested config shows the defaults its parent gives it (`JudgeConfig.judge` is a `TeacherConfig` whose
    model is the calibrated judge, not `TeacherConfig`'s own default model).
    """
    lines = []
    unused = getattr(cls, "unused_fields", frozenset())  # inherited keys this stage ignores (and refuses if set)
    for name, field in _model_fields(cls).items():
        if name in unused:
            continue
        sub = _nested_model(field.annotation)
        default: Any = None
        if defaults is not None:
            default = getattr(defaults, name)
        elif not field.is_required():
            default = field.default if field.default_factory is None else field.default_factory()
        if sub is not None and sub is not cls:
            lines.append(f"  {prefix}{name}: {field.description or ''}")
            lines.append(config_help(sub, prefix=f"{prefix}{name}.", defaults=default if isinstance(default, sub) else None))
            continue
        type_name = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
        default_s = "required" if field.is_required() and defaults is None else f"default {default!r}"
        lines.append(f"  --{prefix}{name}  ({type_name}, {default_s}): {field.description or ''}")
    return "\n".join(lines)
