"""Curation config: an ordered list of typed steps (`step:` picks the kind), strict keys.

    inputs: [data/sharegpt.jsonl, data/alpaca.json]
    out_dir: runs/curated
    steps:
      - step: clean
      - step: dedup
        threshold: 0.5
      - step: language
        keep: [en]
      - step: decontaminate
        eval_sets: [tasks/mmlu.jsonl]

Every step model forbids unknown keys and names the closest valid one, like the
stage configs do (`protege.config` cannot see inside a list of unions).
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import StageConfig

__all__ = [
    "CurateConfig", "CleanStep", "SplitStep", "DedupStep", "LanguageStep", "QualityStep",
    "DecontaminateStep", "MixStep", "SourceMix", "TagStep", "ScoreStep", "Step", "STEP_KINDS",
]

DEFAULT_TEACHER_PHRASES = [
    "as an ai language model", "as a language model", "as a large language model", "chatgpt", "openai",
    "gpt-3.5", "gpt-4", "i am an ai developed by", "i'm an ai developed by", "my knowledge cutoff",
]
DEFAULT_BOILERPLATE = [
    r"^\s*\d+\s*/\s*\d+\s*$",                 # "1 / 1" page counters copied from the ChatGPT UI
    r"^\s*Copy code\s*$", r"Copy to clipboard", r"^\s*Regenerate response\s*$",
    r"ChatGPT (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)\w* \d+ Version.*$",
    r"Free Research Preview\..*$", r"^\s*\d+\s*/\s*\d+\s*(?=\S)",
]
DEFAULT_REFUSALS = [
    "i'm sorry, but i cannot", "i am sorry, but i cannot", "i'm sorry, but i can't", "i cannot fulfill",
    "i can't assist with that", "i cannot assist with that", "i'm not able to provide", "i am unable to provide",
    "i'm unable to help with", "it is not appropriate for me to",
]


class _Step(BaseModel):
    """Base of every step: unknown keys are an error with a 'did you mean' hint."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), list(cls.model_fields), n=1, cutoff=0.5)
                    hint = f" — did you mean `{close[0]}`?" if close else ""
                    name = data.get("step", "?")
                    raise ValueError(f"step `{name}`: unknown key `{key}`{hint} "
                                     f"(valid keys: {', '.join(sorted(cls.model_fields))})")
        return data


class CleanStep(_Step):
    step: Literal["clean"] = "clean"
    html_to_markdown: bool = Field(True, description="convert HTML in messages to Markdown (ShareGPT pages were scraped HTML)")
    boilerplate: list[str] = Field(default_factory=lambda: list(DEFAULT_BOILERPLATE),
                                   description="regexes (multiline) of UI boilerplate to strip from messages")
    teacher_phrases: list[str] = Field(default_factory=lambda: list(DEFAULT_TEACHER_PHRASES),
                                       description="drop conversations mentioning the teacher product (case-insensitive, whole words)")
    teacher_scope: Literal["assistant", "all"] = Field("assistant", description="which turns are searched for teacher phrases")
    roles: Literal["repair", "drop"] = Field("repair", description="broken role order: repair (merge/drop stray turns) or drop the conversation")
    truncate_pairs: bool = Field(True, description="cut a trailing user turn so conversations end with the assistant")


class SplitStep(_Step):
    step: Literal["split"] = "split"
    model: str = Field("gemma-3-270m", description="model (alias, HF folder, .gguf) whose tokenizer counts tokens")
    max_tokens: int = Field(2048, gt=0, description="token budget per piece; conversations are cut at turn boundaries")
    tokens_per_message: int = Field(6, ge=0, description="template overhead counted per message (role markers, end of turn)")
    drop_oversized: bool = Field(False, description="drop pieces whose single user/assistant pair is over budget (else keep; training truncates)")


class DedupStep(_Step):
    step: Literal["dedup"] = "dedup"
    exact: Literal["first_user", "conversation", "none"] = Field(
        "first_user", description="exact-duplicate key: normalized first user turn (Koala), whole conversation, or none")
    near: bool = Field(True, description="near-duplicate detection with MinHash + LSH")
    near_text: Literal["conversation", "user", "first_user"] = Field("conversation", description="text compared for near-duplicates")
    ngram: int = Field(3, ge=1, description="word n-gram (shingle) size")
    threshold: float = Field(0.5, gt=0, le=1, description="Jaccard similarity at or above which two records are near-duplicates")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    top_clusters: int = Field(10, ge=0, description="largest clusters listed in the data card")


class LanguageStep(_Step):
    step: Literal["language"] = "language"
    keep: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep (empty: keep all not dropped)")
    drop: list[str] = Field(default_factory=list, description="codes to drop (used when keep is empty)")
    text: Literal["all", "user", "assistant"] = Field("all", description="which turns are identified")
    min_chars: int = Field(20, ge=0, description="shorter texts are too short to tell: kept, labelled 'und'")
    max_chars: int = Field(2000, gt=0, description="only the first characters are read (speed)")
    annotate: bool = Field(True, description="write the detected language to meta.language")


class QualityStep(_Step):
    step: Literal["quality"] = "quality"
    min_response_words: int = Field(1, ge=0, description="drop if any assistant turn has fewer words")
    max_response_words: int | None = Field(None, description="drop if any assistant turn has more words")
    max_total_words: int | None = Field(None, description="drop conversations longer than this")
    repetition_ngram: int = Field(3, ge=1, description="n for the repeated-n-gram check")
    max_repetition: float = Field(0.3, gt=0, le=1, description="drop if an assistant turn's fraction of repeated n-grams is above this")
    refusals: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS),
                                description="refusal boilerplate phrases (case-insensitive) that drop a conversation")
    drop_truncated: bool = Field(True, description="drop conversations whose generator recorded an answer cut off by "
                                 "its token limit (meta finish_reason(s) == 'length'): training on them teaches "
                                 "the model never to end its turn")
    top_k_by: str | None = Field(None, description="meta key of a score (reward model / judge) for LIMA-style top-k selection")
    top_k: int | None = Field(None, gt=0, description="keep this many best-scoring records (records without a score rank last)")
    top_k_diverse: bool = Field(False, description="LIMA: cluster the records by their first user turn into top_k "
                                                   "groups and keep the best-scoring one of each (quality and "
                                                   "diversity) instead of the top_k best overall")


class DecontaminateStep(_Step):
    step: Literal["decontaminate"] = "decontaminate"
    eval_sets: list[str] = Field(default_factory=list, description="eval sets: records files, task JSONL/JSON files, task YAMLs or built-in task names (arithmetic, ...)")
    fields: list[str] = Field(default_factory=lambda: ["prompt", "question", "instruction", "input", "turns", "query", "text"],
                              description="task-file fields holding the eval prompt (first present wins)")
    ngram: int = Field(13, ge=3, description="word n-gram overlap that marks contamination")
    min_words: int = Field(8, ge=1, description="eval prompts shorter than ngram but at least this long match as a whole")
    bleu_threshold: float | None = Field(20.0, description="sentence BLEU (0-100) of a training prompt vs an eval prompt at or above which it is contaminated (Koala: 20); null disables")
    scope: Literal["user", "all"] = Field("user", description="training turns compared: user prompts, or all turns (n-gram check only)")


class SourceMix(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float | None = Field(None, ge=0, description="share of `total` (needs total)")
    cap: int | None = Field(None, ge=0, description="at most this many records (before epochs)")
    epochs: float = Field(1.0, ge=0, description="repeat the (capped) source this many times; 1.5 = all once + half again")


class MixStep(_Step):
    step: Literal["mix"] = "mix"
    sources: dict[str, SourceMix] = Field(default_factory=dict, description="per-source weight / cap / epochs, by record `source`")
    total: int | None = Field(None, gt=0, description="target size; sources with a weight get total*weight/sum(weights)")
    unlisted: Literal["keep", "drop"] = Field("keep", description="what happens to sources not listed")
    shuffle: bool = Field(True, description="shuffle the mixed output (seeded)")


class ScoreStep(_Step):
    step: Literal["score"] = "score"
    model: str = Field(..., description="reward model folder written by `protege train rm` (or an HF sequence classifier)")
    key: str = Field("rm_score", description="meta key the score is written to (what quality.top_k_by reads)")
    batch_size: int = Field(8, gt=0, description="conversations scored together")
    max_length: int = Field(1024, gt=0, description="tokens kept per conversation (from the end)")


class TagStep(_Step):
    step: Literal["tag"] = "tag"
    positive: str = Field("<|good|>", description="marker for chosen responses (use it at inference)")
    negative: str = Field("<|bad|>", description="marker for rejected responses")
    placement: Literal["system", "user_suffix"] = Field("system", description="where the marker goes: system message or end of the last user turn")
    include_rejected: bool = Field(True, description="also emit the rejected response with the negative marker")
    conversations: Literal["none", "positive"] = Field("none", description="mark plain conversations too (as positive)")


Step = Annotated[Union[CleanStep, SplitStep, DedupStep, LanguageStep, QualityStep, DecontaminateStep, MixStep, TagStep,
                       ScoreStep],
                 Field(discriminator="step")]
STEP_KINDS: tuple[str, ...] = tuple(c.model_fields["step"].default for c in get_args(get_args(Step)[0]))  # in order


def default_steps() -> list[Any]:
    return [CleanStep(), DedupStep(), LanguageStep(), QualityStep()]


class CurateConfig(StageConfig):
    """`protege curate`: ordered curation steps over record files, with removed.jsonl and a data card."""

    inputs: list[str] = Field(default_factory=list, description="record files (JSONL/JSON any known format, parquet, saved datasets)")
    out_dir: str = Field("curated", description="output folder: records.jsonl, removed.jsonl, card.md, card.html, manifest.json")
    steps: list[Step] = Field(default_factory=default_steps, description="ordered steps; each a mapping with `step:` and its options")
    skip_invalid: bool = Field(False, description="list unreadable lines in removed.jsonl instead of stopping at the first")
    seed: int = Field(0, description="seed for sampling in mix")
    format: str = Field("auto", description="input format: auto, alpaca, sharegpt, openai, protege")
    card: bool = Field(True, description="write card.md and card.html")
    workers: int = Field(1, ge=0, description="processes running the per-record steps and dedup's MinHash signing "
                                              "(0: one per CPU core); the output is the same for any number")
    ray_address: str | None = Field(None, description="run those steps as Ray tasks instead: auto (the cluster "
                                    "`ray start` made, or RAY_ADDRESS), local (a Ray instance on this machine), or "
                                    "a cluster address; the output is the same as one worker's")

    @model_validator(mode="before")
    @classmethod
    def _known_steps(cls, data: Any) -> Any:
        steps = data.get("steps") if isinstance(data, dict) else None
        for i, st in enumerate(steps or []):
            if isinstance(st, str):  # `- clean` is shorthand for `- step: clean`
                steps[i] = st = {"step": st}
            if not isinstance(st, dict):
                continue
            kind = st.get("step")
            if kind is None:
                raise ValueError(f"steps[{i}]: missing `step:` (one of {', '.join(STEP_KINDS)})")
            if kind not in STEP_KINDS:
                close = difflib.get_close_matches(str(kind), STEP_KINDS, n=1, cutoff=0.4)
                hint = f" — did you mean `{close[0]}`?" if close else ""
                raise ValueError(f"steps[{i}]: unknown step `{kind}`{hint} (steps: {', '.join(STEP_KINDS)})")
        return data
