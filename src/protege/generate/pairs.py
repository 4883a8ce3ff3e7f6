"""pairs: sample K answers per prompt from a policy, then label preference pairs.

The policy is any teacher backend (the engine on a local model, or an OpenAI-compatible
API); every sampled answer goes through the teacher cache, so a run killed mid-way resumes
without generating an answer twice. Labelling, in this version, is by a declarative rule
whose truth is known (`label: rule`), so a trained RM or DPO policy can be checked against ground
truth, or by a reward model (`label: rm`: the best-scored answer against the worst, margin = the
score difference, as LLaMA-2 built pairs from its RMs), or by an LLM judge (`label: judge`: samples
are paired off, each pair judged in both orders by the judge `eval judge` calibrates, the same way: a
local judge's verdict probabilities averaged over both orders, which cancels a position bias, with
p - 0.5 as the margin; generated verdicts must agree across orders; ties are dropped and counted, as a
position-biased judge must not make labels). Rules:

- `ends_turn`:     the answer ended its turn (finish reason "stop") within `max_tokens` tokens;
- `contains_gold`: the answer contains the record's gold answer (`meta[gold_field]`, e.g.
                   protege's arithmetic items), compared on normalised text;
- `final_number`:  the answer's last number is the gold number (GSM8K-style grading: a chain that passes
                   the right number on its way to a wrong one fails);
- `shorter`:       the answer has at most `max_tokens` completion tokens (a length preference).

For each prompt, answers that satisfy the rule are paired with answers that do not (up to
`pairs_per_prompt` pairs, drawn from the seed); prompts whose K answers all pass or all fail
carry no contrast and are counted, not written. Every sample is kept in `samples.jsonl`
(rejection sampling and best-of-K curves reuse them).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable, Literal

from pydantic import Field, field_validator

from ..config import MaxNewTokens, Sampling, StageConfig, sampling_field
from ..errors import StageError
from ..manifest import Timer
from ..models import DEFAULT_JUDGE
from ..records import Comparison, JsonlWriter
from ..teachers import Teacher, TeacherConfig, TeacherResponse, make_teacher
from ..train.rewards import GOLD_RULES, ends_within, matches_gold  # one definition for pair labels and RL rewards
from .common import GeneratorRun, clean_reply, sampling
from .distill import load_prompts

__all__ = ["PairsConfig", "rule_passes", "run"]


class PairsConfig(StageConfig):
    prompts: str | None = Field(None, description="prompt records (any supported format); only system + user turns are used")
    prompts_format: str = Field("auto", description="format of `prompts`")
    out_dir: str = Field("runs/pairs", description="where records.jsonl (pairs), samples.jsonl, manifest.json and the cache go")
    policy: TeacherConfig = Field(default_factory=lambda: TeacherConfig(model="gemma-3-270m"), description="who samples the answers")
    k: int = Field(4, ge=2, description="answers sampled per prompt")
    sampling: Sampling = sampling_field("how the K answers are sampled (temperature > 0: they must differ)",
                                        max_new_tokens=128, temperature=1.0)
    seed: int = Field(0, description="seeds sampling and the choice of pairs")
    limit: int = Field(0, ge=0, description="use only the first N prompts (0: all)")
    label: Literal["rule", "rm", "judge"] = Field("rule", description="who labels: a rule with a known truth, a reward model, or an LLM judge")
    rule: Literal["ends_turn", "contains_gold", "final_number", "shorter"] = Field("ends_turn", description="label rule: the labelling rule (see module docs)")
    rm: str | None = Field(None, description="label rm: reward model folder (from `train rm`)")
    min_margin: float = Field(0.0, ge=0.0, description="label rm: drop pairs whose score difference is below this")
    judge: TeacherConfig = Field(default_factory=lambda: TeacherConfig(model=DEFAULT_JUDGE),
                                 description="label judge: who judges (asked in both orders); the default is the "
                                 "built-in judge that passes `eval judge`'s calibration")
    judge_verdicts: Literal["auto", "logprob", "generate"] = Field(
        "auto", description="label judge: verdicts from the judge's next-token probabilities, averaged over both "
        "orders (logprob: a local judge; the path `eval judge` calibrates), or from generated text, where the "
        "orders must agree (generate); auto = logprob when the judge can be scored")
    judge_tie_margin: float = Field(0.1, ge=0, le=0.5, description="label judge, logprob: pairs whose "
                                    "order-averaged probability is within this of 0.5 are ties (not written)")
    judge_max_new_tokens: MaxNewTokens = Field(64, description="label judge, generate: verdict length budget")
    max_tokens: int = Field(64, ge=1, description="ends_turn / shorter: the token limit of a passing answer")
    gold_field: str = Field("answer", description="contains_gold / final_number: the prompt record's meta field with the gold answer")
    pairs_per_prompt: int = Field(1, ge=1, description="most pairs written per prompt (passing x failing answers)")
    chunk_size: int = Field(32, ge=1, description="prompts sampled together; each chunk is written when done")
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("sampling")
    @classmethod
    def _sampled(cls, value: Sampling) -> Sampling:
        if value.temperature <= 0:
            raise ValueError("temperature must be > 0: greedy decoding gives K equal answers, so no pairs")
        return value


def rule_passes(rule: str, response: TeacherResponse, max_tokens: int, gold: str | None = None) -> bool:
    """Whether one sampled answer satisfies the labelling rule."""
    tokens = int(response.usage.get("completion_tokens", 0))
    if rule == "ends_turn":
        return ends_within(response.finish_reason, tokens, max_tokens)
    if rule == "shorter":
        return tokens <= max_tokens
    if rule in GOLD_RULES:
        if gold is None:
            raise StageError(f"rule {rule} needs a gold answer in every prompt record's meta")
        return matches_gold(rule, response.text, str(gold))
    raise StageError(f"unknown rule {rule!r}")


def _rule_pairs(passed: list[bool], texts: list[str], rng: random.Random, stats: Counter) -> list[tuple[int, int, None]]:
    """(passing, failing, no margin) index pairs in a seeded order; a prompt without contrast is counted."""
    good = [j for j, ok in enumerate(passed) if ok and texts[j]]
    bad = [j for j, ok in enumerate(passed) if not ok and texts[j]]
    combos = [(g, b, None) for g in good for b in bad if texts[g] != texts[b]]
    if not combos:
        stats["no_contrast_all_pass" if not bad else "no_contrast_all_fail" if not good else "no_contrast_equal"] += 1
    rng.shuffle(combos)
    return combos


def _rm_pairs(scores: list[float], texts: list[str], min_margin: float, stats: Counter) -> list[tuple[int, int, float]]:
    """Best-scored vs worst, then second best vs second worst, ...; margin = the score difference."""
    order = sorted((j for j in range(len(texts)) if texts[j]), key=lambda j: -scores[j])
    out, reason = [], "no_contrast_equal"
    for g, b in zip(order, reversed(order)):
        if scores[g] <= scores[b] or texts[g] == texts[b]:
            break
        if scores[g] - scores[b] < min_margin:
            reason = "below_min_margin"
            break
        out.append((g, b, round(scores[g] - scores[b], 4)))
    if not out:
        stats[reason] += 1
    return out


def _judge_pairs(judge: Teacher, prompt: list[dict[str, str]], texts: list[str], cfg: PairsConfig,
                 stats: Counter) -> list[tuple[int, int, float | None]]:
    """Samples paired off (0, 1), (2, 3), ...; each pair judged in both orders. Log-prob verdicts: the
    order-averaged probability decides and is the pair's margin (p - 0.5); generated verdicts: the orders must
    agree. The same rule as `eval judge` (`evaluate.verdicts.order_outcome`)."""
    from ..evaluate.verdicts import order_outcome, p_first, pairwise_messages, parse_pairwise, verdict_probs

    question = [next(m["content"] for m in reversed(prompt) if m["role"] == "user")]
    duos = [(a, b) for a, b in zip(range(0, len(texts) - 1, 2), range(1, len(texts), 2))
            if texts[a] and texts[b] and texts[a] != texts[b]]
    if not duos:
        stats["no_contrast_equal"] += 1
        return []
    convs = [pairwise_messages(question, [texts[x]], [texts[y]]) for a, b in duos for x, y in ((a, b), (b, a))]
    if _logprob_verdicts(cfg, judge):
        probs = verdict_probs(judge, convs, progress=False)
        verdicts = [(None, None, p_first(probs[2 * n], probs[2 * n + 1])) for n in range(len(duos))]
    else:
        replies = judge.complete(convs, sampling(Sampling(max_new_tokens=cfg.judge_max_new_tokens)))
        verdicts = [(parse_pairwise(replies[2 * n].text), parse_pairwise(replies[2 * n + 1].text), None)
                    for n in range(len(duos))]
    out = []
    for (a, b), (v1, v2, p) in zip(duos, verdicts):
        outcome = order_outcome(v1, v2, p, cfg.judge_tie_margin)
        margin = None if p is None else round(abs(p - 0.5), 6)
        if outcome == "win":
            out.append((a, b, margin))
        elif outcome == "loss":
            out.append((b, a, margin))
        else:
            stats[f"judge_{outcome}"] += 1  # judge_tie (incl. orders that disagree) or judge_error
    return out


def _logprob_verdicts(cfg: PairsConfig, judge: Teacher) -> bool:
    scorable = bool(getattr(judge, "scores_choices", False))
    if cfg.judge_verdicts == "logprob" and not scorable:
        raise StageError(f"generate pairs: judge_verdicts logprob needs a local judge; {judge.name} cannot be "
                         "scored (use judge_verdicts: generate)")
    return cfg.judge_verdicts != "generate" and scorable


def _rm_scorer(spec: str) -> Callable[[list[dict[str, str]], list[str]], list[float]]:
    """The reward model as RL and rejection sampling score with it (`train.rewards.make_reward`)."""
    from ..train.rewards import PromptItem, RewardConfig, make_reward

    reward = make_reward(RewardConfig(kind="rm", rm=spec))
    return lambda prompt, texts: reward([PromptItem("", prompt)] * len(texts), texts, [0] * len(texts),
                                        ["stop"] * len(texts))


def run(config: PairsConfig) -> dict[str, Any]:
    """Sample, label and write pairs; returns the manifest counts."""
    cfg = config
    if cfg.label == "rm" and not cfg.rm:
        raise StageError("generate pairs: label rm needs `rm`, a reward model folder (from `train rm`)")
    prompts = load_prompts(cfg.prompts, cfg.prompts_format, cfg.limit)
    scorer = _rm_scorer(cfg.rm) if cfg.label == "rm" else None
    gen = GeneratorRun("generate.pairs", cfg, cfg.out_dir, cfg.policy)
    judge = make_teacher(cfg.judge, gen.out_dir / "judge") if cfg.label == "judge" else None
    samples = JsonlWriter(gen.out_dir / "samples.jsonl")
    stats: Counter[str] = Counter()
    with gen.progress(len(prompts), "pairs", "prompt", show=cfg.progress) as bar, Timer() as timer:
        for start in range(0, len(prompts), cfg.chunk_size):
            chunk = prompts[start:start + cfg.chunk_size]
            convs = [p for _, _, p, _ in chunk for _ in range(cfg.k)]
            params = [sampling(cfg.sampling,
                               seed=cfg.seed * 1_000_003 + (start + i) * 101 + j)
                      for i in range(len(chunk)) for j in range(cfg.k)]
            outs = gen.teacher.complete(convs, params)
            for i, (pid, psource, prompt, meta) in enumerate(chunk):
                answers = outs[i * cfg.k:(i + 1) * cfg.k]
                texts = [clean_reply(a.text) for a in answers]
                sample = {"prompt_id": pid, "prompt": prompt, "answers": texts,
                          "finish_reasons": [a.finish_reason for a in answers],
                          "completion_tokens": [int(a.usage.get("completion_tokens", 0)) for a in answers]}
                stats["samples"] += len(answers)
                if judge is not None:
                    chosen = _judge_pairs(judge, prompt, texts, cfg, stats)
                elif scorer is None:
                    gold = meta.get(cfg.gold_field) if cfg.rule in GOLD_RULES else None
                    if cfg.rule in GOLD_RULES and gold is None:
                        raise StageError(f"prompt {pid}: rule {cfg.rule} needs `meta.{cfg.gold_field}` (the gold answer)")
                    passed = sample["passed"] = [rule_passes(cfg.rule, a, cfg.max_tokens, gold) for a in answers]
                    stats["samples_passed"] += sum(passed)
                    chosen = _rule_pairs(passed, texts, random.Random(f"{cfg.seed}/{pid}"), stats)
                else:
                    scores = sample["scores"] = scorer(prompt, texts)
                    chosen = _rm_pairs(scores, texts, cfg.min_margin, stats)
                samples.write(sample)
                for g, b, margin in chosen[:cfg.pairs_per_prompt]:
                    gen.writer.write(Comparison(prompt, {"role": "assistant", "content": texts[g]},
                                                {"role": "assistant", "content": texts[b]}, margin, source="pairs",
                                                meta={**meta, "prompt_id": pid, "prompt_source": psource,
                                                      "label": cfg.rule if cfg.label == "rule" else cfg.label,
                                                      "k": cfg.k}))
                    stats["records"] += 1
            if bar is not None:
                bar.update(len(chunk))
    samples.close()
    if judge is not None:
        judge.close()
    counts = {"records": stats["records"], "prompts": len(prompts), "samples": stats["samples"],
              **({"pass_rate": round(stats["samples_passed"] / max(stats["samples"], 1), 4)}
                 if cfg.label == "rule" else {}),
              "skipped": {k: v for k, v in stats.items() if k.startswith(("no_contrast", "below", "judge_"))},
              "policy": gen.teacher_counts()}
    gen.finish(counts, timer.seconds, inputs=[cfg.prompts], outputs=[gen.records_path, gen.out_dir / "samples.jsonl"])
    return counts
