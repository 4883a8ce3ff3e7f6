"""`protege eval rm`: score answer sets with a reward model (from `train rm`, or any HF sequence classifier).

Each answer set (an `eval answer` folder or its answers.jsonl) gets one score per prompt: the RM's
score of the conversation's *last* answer, with the earlier turns (the model's own answers) in the
history, read at the last token exactly as in training. Output: `rm_scores.json` per input,
{"model", "rm", "n", "mean", "ci" (bootstrap 95%), "std", "scores"}, which `protege report` shows as
an RM column next to the judge's. Scores of different reward models are not on one scale: compare
models under the same RM only.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Field

from ..config import StageConfig
from ..errors import StageError
from ..manifest import StageRun
from .answer import display_name, read_answers
from .intervals import bootstrap_ci

__all__ = ["RMScoreConfig", "run", "RM_SCORES_FILE"]

RM_SCORES_FILE = "rm_scores.json"


class RMScoreConfig(StageConfig):
    rm: str = Field(..., description="reward model folder (the `model` folder `train rm` writes)")
    answers: list[str] = Field(default_factory=list, description="answer sets: `eval answer` folders or answers.jsonl files")
    out_dir: str = Field("runs/eval/rm", description="output folder: one <model>/rm_scores.json per answer set")
    batch_size: int = Field(8, ge=1, description="conversations scored together")
    max_length: int = Field(1024, ge=2, description="tokens kept per conversation (its end, where the score is read)")
    seed: int = Field(0, description="bootstrap seed")


def _folder_name(model: str, index: int) -> str:
    """A folder name from a model name read out of an answers file (user data): it must stay inside out_dir."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or f"model-{index}"
    return safe


def run(cfg: RMScoreConfig) -> dict[str, Any]:
    """Score every answer set; returns {model: mean score}."""
    from ..chat import ChatFormat
    from ..train.rm import load_reward_model, score

    if not cfg.answers:
        raise StageError("eval rm: `answers` is empty; give one or more `eval answer` folders")
    stage = StageRun("eval-rm", cfg, cfg.out_dir)
    out = stage.out
    model, tok = load_reward_model(cfg.rm)
    chat = ChatFormat.from_tokenizer(tok)
    means: dict[str, float] = {}
    outputs = []
    for src in cfg.answers:
        recs = read_answers(src)
        prompts, finals = [], []
        for r in recs:
            turns, answers = r.get("turns") or [], r.get("answers") or []
            if not answers or len(answers) != len(turns):
                raise StageError(f"{src}: record {r.get('id')} has {len(turns)} turns but {len(answers)} answers")
            history = []
            for q, a in zip(turns[:-1], answers[:-1]):
                history += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            prompts.append(history + [{"role": "user", "content": turns[-1]}])
            finals.append(answers[-1])
        scores = score(model, chat, prompts, finals, cfg.batch_size, cfg.max_length)
        name = recs[0].get("model") or display_name(str(src)) if recs else display_name(str(src))
        mean = sum(scores) / len(scores) if scores else float("nan")
        std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5 if scores else float("nan")
        result = {"model": name, "rm": str(cfg.rm), "n": len(scores), "mean": round(mean, 4),
                  "ci": [round(x, 4) for x in bootstrap_ci(scores, seed=cfg.seed)], "std": round(std, 4),
                  "scores": [{"id": r.get("id"), "score": round(s, 4)} for r, s in zip(recs, scores)]}
        target = out / _folder_name(name, len(outputs)) / RM_SCORES_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2))
        outputs.append(target)
        means[name] = result["mean"]
    stage.finish(inputs=list(cfg.answers), outputs=outputs, counts={"models": means})
    return means
