"""`protege data`: convert between formats, validate files, and summarise them."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from .config import StageConfig
from .errors import StageError
from .files import atomic_path
from .outputs import publish, refuse_clobber
from .formats import FORMATS, iter_source, to_alpaca, to_openai, to_sharegpt, to_trl
from .records import RecordError
from .records import Comparison, Conversation, JsonlWriter, read_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["convert", "stats", "ConvertConfig", "run_convert", "SampleConfig", "run_sample"]

_WRITERS = {"alpaca": to_alpaca, "sharegpt": to_sharegpt, "openai": to_openai, "trl": to_trl,
            "protege": lambda r: r.to_dict()}


def _conversation_writer(write: Any, fmt: str) -> Any:
    def w(rec: Any) -> dict[str, Any]:
        if isinstance(rec, Comparison):
            raise RecordError(f"record {rec.id} is a preference pair; --to {fmt} holds conversations "
                              "(use --to protege or --to trl)")
        return write(rec)
    return w


def convert(src: str | Path, out: str | Path, from_format: str = "auto", to_format: str = "protege",
            skipped: dict[str, int] | None = None, repeated: list[str] | None = None, source: str | None = None) -> int:
    """Convert a file/dataset in `from_format` to `to_format` JSONL; return the record count.

    Written to a temp file and renamed, so a bad line (reported as `file:line`) leaves no half-written output.
    Unusable preference pairs (equal answers, differing prompts, ties) are counted by reason into `skipped`;
    ids an earlier record already used are appended to `repeated` (kept as they are: `curate` renames them).
    `source` replaces every record's `source` (what curate's mix caps and weights are keyed by).
    """
    out = Path(out)
    refuse_clobber([src] if Path(src).exists() else [], [out], "data convert")
    if out.is_dir():
        raise StageError(f"{out}: is a folder; give the output file's path (e.g. {out}/records.jsonl)")
    write = _WRITERS[to_format]
    if to_format in ("alpaca", "sharegpt", "openai"):
        write = _conversation_writer(write, to_format)
    skipped = skipped if skipped is not None else {}
    seen: set[str] = set()
    with atomic_path(out) as tmp, JsonlWriter(tmp) as w:
        for rec in iter_source(src, from_format, skipped=skipped):
            if rec.id in seen and repeated is not None:
                repeated.append(rec.id)
            seen.add(rec.id)
            if source:
                rec.source = source
            w.write(write(rec))
    return w.written


def stats(path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> dict[str, Any]:
    """Counts of records and turns; characters (and tokens, given a tokenizer) per role."""
    out: dict[str, Any] = {"records": 0, "conversations": 0, "comparisons": 0, "turns": 0, "sources": defaultdict(int)}
    chars: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    messages: dict[str, int] = defaultdict(int)
    lengths = {"chosen": 0, "rejected": 0, "chosen_longer": 0, "margins": []}
    skipped: dict[str, int] = {}
    for rec in iter_source(path, skipped=skipped):
        out["records"] += 1
        out["sources"][rec.source or "-"] += 1
        if isinstance(rec, Conversation):
            out["conversations"] += 1
            msgs = rec.messages
            out["turns"] += sum(1 for m in msgs if m["role"] == "user")
        else:
            assert isinstance(rec, Comparison)
            out["comparisons"] += 1
            msgs = rec.prompt + [{"role": "chosen", "content": rec.chosen["content"]},
                                 {"role": "rejected", "content": rec.rejected["content"]}]
            out["turns"] += sum(1 for m in rec.prompt if m["role"] == "user")
            lengths["chosen_longer"] += len(rec.chosen["content"]) > len(rec.rejected["content"])
            if rec.margin is not None:
                lengths["margins"].append(rec.margin)
        for m in msgs:
            messages[m["role"]] += 1
            chars[m["role"]] += len(m["content"])
            if tokenizer is not None:
                tokens[m["role"]] += len(tokenizer(m["content"], add_special_tokens=False)["input_ids"])
    out["sources"] = dict(out["sources"])
    out["skipped"] = skipped
    if out["comparisons"]:
        # A reward model can learn "longer is better" from a set where chosen answers are mostly longer.
        m = lengths["margins"]
        out["pairs"] = {"chosen_longer_share": round(lengths["chosen_longer"] / out["comparisons"], 3),
                        "with_margin": len(m), "mean_margin": round(sum(m) / len(m), 3) if m else None}
    out["per_role"] = {
        role: {"messages": messages[role], "chars": chars[role], "mean_chars": round(chars[role] / messages[role], 1),
               **({"tokens": tokens[role], "mean_tokens": round(tokens[role] / messages[role], 1)} if tokenizer else {})}
        for role in messages
    }
    return out


class ConvertConfig(StageConfig):
    src: str = Field(..., description="file or folder to convert (JSONL/JSON; format detected unless `from_format`)")
    from_format: str = Field("auto", description="input format: auto, alpaca, sharegpt, openai, protege, prompt, "
                             "or a preference format (hh, trl, ...)")
    to_format: Literal["protege", "alpaca", "sharegpt", "openai", "trl"] = Field("protege", description="output format")
    source: str | None = Field(None, description="name written into every record's `source` (curate's `mix` caps "
                               "and weights sources by it); default: the record's own, else the file's name")
    out_dir: str = Field("runs/convert", description="output folder (records.jsonl + manifest.json)")

    @field_validator("from_format")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ("auto", *FORMATS):
            raise ValueError(f"unknown format {value!r} (known: auto, {', '.join(FORMATS)})")
        return value


def run_convert(config: ConvertConfig) -> dict[str, Any]:
    """`protege data convert` as a recipe stage: a user's file in, one validated JSONL out (file:line errors)."""
    from .manifest import StageRun

    refuse_clobber([config.src], [config.out_dir], "data.convert")
    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    skipped: dict[str, int] = {}
    with publish(config.out_dir) as staged:  # config, records and manifest appear together
        stage = StageRun("data.convert", config, staged)
        n = convert(config.src, staged / "records.jsonl", config.from_format, config.to_format, skipped,
                    source=config.source)
        counts = {"records": n, **{f"skipped_{k}": v for k, v in skipped.items()}}
        stage.finish(inputs=[config.src], outputs=[Path(config.out_dir) / "records.jsonl"], counts=counts)
    return counts


class SampleConfig(StageConfig):
    src: str = Field(..., description="records file to sample from")
    n: int = Field(..., description="how many records to keep (all of them if the file has fewer)")
    seed: int = Field(0, description="shuffle seed; with the same seed, a smaller n is a prefix of a larger n's sample")
    out_dir: str = Field("runs/sample", description="output folder (records.jsonl + manifest.json)")
    write_rest: bool = Field(False, description="also write rest.jsonl: the records not sampled (a held-out split)")


def run_sample(config: SampleConfig) -> dict[str, Any]:
    """Deterministic nested subsample: shuffle once by seed, keep the first n (for data-size sweeps).

    With `write_rest` the records not kept go to rest.jsonl, so one stage makes a held-out split."""
    import random

    from .manifest import StageRun
    from .records import write_records

    refuse_clobber([config.src], [config.out_dir], "data.sample")
    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    with publish(config.out_dir) as staged:  # config, records and manifest appear together
        stage = StageRun("data.sample", config, staged)
        records = list(read_records(config.src))
        order = list(range(len(records)))
        random.Random(config.seed).shuffle(order)
        kept = [records[i] for i in order[: config.n]]
        write_records(staged / "records.jsonl", kept)
        names = ["records.jsonl"]
        if config.write_rest:  # the complement, in file order: sample = eval set, rest = training set
            rest_ids = set(order[config.n:])
            names.append("rest.jsonl")
            write_records(staged / "rest.jsonl", [r for i, r in enumerate(records) if i in rest_ids])
        counts = {"in": len(records), "kept": len(kept)}
        if config.write_rest:
            counts["rest"] = len(records) - len(kept)
        stage.finish(inputs=[config.src], outputs=[Path(config.out_dir) / n for n in names], counts=counts)
    return counts
