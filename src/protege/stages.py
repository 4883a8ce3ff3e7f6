"""The one registry of what protege can run: every stage kind a recipe names, and through it
every `protege generate KIND` and `protege train METHOD` subcommand.

A kind maps to "module:ConfigClass:run_function" and a help line. Stages talk through
files only; the recipe runner and the CLI need nothing from a stage but these names.
Adding a training method or a generator is one entry here.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from typing import Any, Callable, NamedTuple

from .config import ConfigError, StageConfig

__all__ = ["StageKind", "STAGE_KINDS", "stage_kind", "kinds_under"]


class StageKind(NamedTuple):
    target: str  # "module:ConfigClass:run_function"
    help: str


STAGE_KINDS: dict[str, StageKind] = {
    "pull": StageKind("protege.models.pull:PullConfig:run_pull", "fetch + verify + convert built-in models"),
    "data.convert": StageKind("protege.data_tools:ConvertConfig:run_convert",
                              "a user's file (Alpaca, ShareGPT, OpenAI, HH, TRL, ...) into one validated JSONL"),
    "data.sample": StageKind("protege.data_tools:SampleConfig:run_sample", "a seeded sample of a record file (+ the rest)"),
    "generate.self-instruct": StageKind(
        "protege.generate.selfinstruct:SelfInstructConfig:run",
        "Self-Instruct (Alpaca): bootstrap new tasks from seed tasks with a teacher, then answer them"),
    "generate.distill": StageKind(
        "protege.generate.distill:DistillConfig:run",
        "distill (Vicuna/GPT4All): answer a prompt set with a teacher, multi-turn prompts turn by turn"),
    "generate.orca": StageKind(
        "protege.generate.orca:OrcaConfig:run",
        "Orca explanation traces: task-typed system messages; several teachers = progressive stages"),
    "generate.self-chat": StageKind(
        "protege.generate.selfchat:SelfChatConfig:run",
        "self-chat (Baize): the teacher plays user and assistant from seed topics"),
    "generate.pairs": StageKind(
        "protege.generate.pairs:PairsConfig:run",
        "preference pairs: sample K answers per prompt from a policy, label them by a rule with a known truth"),
    "curate": StageKind("protege.curate:CurateConfig:run", "clean, dedup, filter and decontaminate conversations"),
    "train.tokenizer": StageKind("protege.train.tokenizer:TokenizerConfig:run",
                                 "byte-level BPE tokenizer trained on a corpus (HF tokenizers), ChatML special tokens"),
    "train.pretrain": StageKind("protege.train.pretrain:PretrainConfig:run",
                                "pretraining from scratch: a LLaMA-architecture model on a text corpus"),
    "train.sft": StageKind("protege.train.sft:SFTConfig:run",
                           "supervised fine-tuning on conversations (loss on assistant turns; LoRA or full)"),
    "train.rm": StageKind("protege.train.rm:RMConfig:run",
                          "reward model on preference pairs (scalar head, margin ranking loss; LoRA or full)"),
    "train.dpo": StageKind("protege.train.dpo:DPOConfig:run",
                           "Direct Preference Optimization on preference pairs (reference = adapters off; cached)"),
    "train.rs": StageKind("protege.train.rs:RSConfig:run",
                          "rejection sampling (LLaMA-2): sample k answers per prompt, keep the reward's best, SFT on them"),
    "train.ppo": StageKind("protege.train.ppo:PPOConfig:run",
                           "PPO with a value head and a per-token KL penalty to the reference (adapters off), GAE"),
    "train.grpo": StageKind("protege.train.grpo:GRPOConfig:run",
                            "GRPO: sample G answers per prompt, reward them (rule or RM), group-relative advantages"),
    "scaling": StageKind("protege.scaling.run:ScalingConfig:run",
                         "IsoFLOP scaling (Chinchilla): model sizes per compute budget, then N_opt(C), D_opt(C)"),
    "eval.bench": StageKind("protege.evaluate.bench:BenchConfig:run", "substance: benchmark accuracy"),
    "eval.answer": StageKind("protege.evaluate.answer:AnswerConfig:run", "answer a prompt set with a model"),
    "eval.judge": StageKind("protege.evaluate.judge:JudgeConfig:run", "style: an LLM judge compares two answer sets"),
    "eval.rm": StageKind("protege.evaluate.rm_score:RMScoreConfig:run", "score answer sets with a reward model"),
    "export": StageKind("protege.export:ExportConfig:run",
                        "merged HF folder + GGUF files (llama.cpp converter/quantizer), verified in llama.cpp"),
    "report": StageKind("protege.report:ReportConfig:run", "style vs substance report (HTML + Markdown)"),
}


# Kinds that stage their outputs and publish them with the manifest last (`outputs.publish`): their
# previous outputs, manifest included, stay valid until the new ones are complete.
PUBLISHED = frozenset({"curate", "data.convert", "data.sample"})


def stage_kind(kind: str) -> tuple[type[StageConfig], Callable[[Any], dict]]:
    """(config class, run function) of a registered kind; unknown kinds get a "did you mean"."""
    if kind not in STAGE_KINDS:
        close = difflib.get_close_matches(kind, list(STAGE_KINDS), n=1)
        hint = f" — did you mean `{close[0]}`?" if close else ""
        raise ConfigError(f"unknown stage kind `{kind}`{hint} (known: {', '.join(STAGE_KINDS)})")
    module, cls_name, fn_name = STAGE_KINDS[kind].target.split(":")
    mod = importlib.import_module(module)
    try:
        config_cls, run = getattr(mod, cls_name), getattr(mod, fn_name)
    except AttributeError as err:  # a registry entry out of step with its module: a bug in protege
        raise RuntimeError(f"stage kind {kind}: {STAGE_KINDS[kind].target} is broken: {err}") from None

    @functools.wraps(run)
    def guarded(config: StageConfig) -> dict:
        from pathlib import Path

        from .outputs import begin, refuse_config_clobber

        refuse_config_clobber(config, kind)  # checked here once, for the CLI and recipes alike
        out_dir = getattr(config, "out_dir", None)
        if out_dir and kind not in PUBLISHED and Path(out_dir).is_dir():
            begin(out_dir)  # resumes in place: no old manifest may describe half-rewritten outputs
        return run(config)

    return config_cls, guarded


def kinds_under(prefix: str) -> dict[str, StageKind]:
    """{"sft": ..., "dpo": ...} for prefix "train": the subcommands of one CLI group."""
    return {k[len(prefix) + 1:]: v for k, v in STAGE_KINDS.items() if k.startswith(prefix + ".")}
