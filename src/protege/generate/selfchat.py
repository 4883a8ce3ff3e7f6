"""self-chat (Baize): the teacher plays both the user and the assistant, starting from seed topics.

Each conversation opens with a seed topic (protege's own list, or yours) as the user's
first message. Then, turn by turn: the teacher answers as the assistant; the teacher,
shown the transcript and asked to play the curious person, writes the user's next
message (or `[END]` when it has no more questions). A conversation stops at the turn
limit, when the user ends it, or when a message degenerates (empty, looping n-grams,
or near-copy of an earlier message of the same speaker); a degenerate exchange is dropped,
so every record ends with a usable assistant answer. Conversations advance together in
chunks, so each teacher call is a full batch.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

from pydantic import Field

from ..config import Sampling, StageConfig, sampling_field
from ..errors import StageError
from ..manifest import Timer
from ..records import Conversation
from ..teachers import TeacherConfig
from ..files import json_lines
from .common import GeneratorRun, clean_reply, data_file, read_yaml_data, sampling
from .text import is_degenerate

__all__ = ["SelfChatConfig", "load_topics", "user_turn_prompt", "clean_turn", "run"]

END = "[END]"


class SelfChatConfig(StageConfig):
    out_dir: str = Field("runs/self-chat", description="where records.jsonl, manifest.json and the teacher cache go")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="plays both sides")
    topics: str | None = Field(None, description="YAML list or JSONL ({topic}) of opening messages; default: protege's 64")
    n: int = Field(0, ge=0, description="conversations to make (0: one per topic; more cycles through shuffled topics)")
    max_turns: int = Field(3, ge=1, description="user turns per conversation at most")
    sampling: Sampling = sampling_field("how each message is sampled", max_new_tokens=192, temperature=0.7, top_p=0.95)
    seed: int = Field(0, description="seeds topic order and sampling")
    max_repetition: float = Field(0.5, ge=0, le=1, description="a message whose repeated word-3-gram share exceeds this is degenerate")
    max_similarity: float = Field(0.8, ge=0, le=1, description="a message with ROUGE-L above this vs an earlier one of the same speaker is degenerate")
    chunk_size: int = Field(32, ge=1, description="conversations advanced together; each chunk is written when done")
    progress: bool = Field(True, description="show a progress bar")


def load_topics(path: str | None) -> list[str]:
    src = path or data_file("selfchat_topics.yaml")
    if str(src).endswith(".jsonl"):
        topics = [str(r.get("topic", "")) if isinstance(r, dict) else str(r) for _, r in json_lines(src)]
    else:
        data = read_yaml_data(src)
        if not isinstance(data, list):
            raise StageError(f"{src}: expected a YAML list of topics")
        topics = [str(t.get("topic", "")) if isinstance(t, dict) else str(t) for t in data]
    topics = [t.strip() for t in topics if t and t.strip()]
    if not topics:
        raise StageError(f"{src}: no topics")
    return topics


def user_turn_prompt(messages: list[dict[str, str]]) -> str:
    """Ask the teacher to write the *user's* next message, given the transcript so far."""
    lines = [f"{'Person' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    return ("Here is a conversation between a curious person and an AI assistant.\n\n" + "\n\n".join(lines) +
            "\n\nYou are the person. Write the person's next message: a short follow-up question or comment "
            f"about what the assistant said. Reply with that message only. If the person has no more questions, "
            f"reply with {END}.")


# A weak teacher often labels its turn or keeps writing the other side of the dialogue.
_ROLES = r"(?:person|user|human|assistant|ai)"
_LABEL = re.compile(rf"^\s*(?:\[{_ROLES}\]\s*:?|(?:{_ROLES}|you)\s*:)\s*", re.IGNORECASE)  # "User:", "[Human]" (Baize)
_OTHER_SIDE = re.compile(rf"\n\s*(?:\[{_ROLES}\]|{_ROLES}\s*:)", re.IGNORECASE)


def clean_turn(text: str) -> str:
    """A generated message without a leading role label, cut where it starts writing another speaker."""
    text = _LABEL.sub("", text.strip().strip('"'), count=1)
    text = _OTHER_SIDE.split(text, maxsplit=1)[0]
    return clean_reply(text.strip().strip('"').strip())


def run(config: SelfChatConfig) -> dict[str, Any]:
    """Make self-chat conversations; returns the manifest counts."""
    cfg = config
    topics = load_topics(cfg.topics)
    rng = random.Random(cfg.seed)
    n = cfg.n or len(topics)
    order: list[str] = []
    while len(order) < n:
        batch = list(topics)
        if cfg.n:
            rng.shuffle(batch)
        order.extend(batch)
    order = order[:n]
    gen = GeneratorRun("generate.self-chat", cfg, cfg.out_dir, cfg.teacher)
    teacher = gen.teacher
    stops: Counter[str] = Counter()
    turns_hist: Counter[int] = Counter()
    written = rejected = 0
    with gen.progress(n, "self-chat", "conv", show=cfg.progress) as bar, Timer() as timer:
        for start in range(0, n, cfg.chunk_size):
            chunk = order[start:start + cfg.chunk_size]
            convs = [[{"role": "user", "content": t}] for t in chunk]
            why: list[str | None] = [None] * len(chunk)
            for turn in range(cfg.max_turns):
                live = [i for i in range(len(chunk)) if why[i] is None]
                if not live:
                    break
                seed = lambda i, side: cfg.seed * 1_000_003 + (start + i) * 101 + 2 * turn + side  # noqa: E731
                outs = teacher.complete([convs[i] for i in live], [
                    sampling(cfg.sampling, seed(i, 0)) for i in live])
                for i, out in zip(live, outs):
                    text = clean_turn(out.text)
                    earlier = [m["content"] for m in convs[i] if m["role"] == "assistant"]
                    bad = is_degenerate(text, earlier, cfg.max_repetition, cfg.max_similarity)
                    if bad:  # drop the unanswered user message: records end with a usable answer
                        why[i] = f"assistant_{bad}"
                        convs[i] = convs[i][:-1]
                    else:
                        convs[i].append({"role": "assistant", "content": text})
                live = [i for i in live if why[i] is None]
                if turn == cfg.max_turns - 1:
                    for i in live:
                        why[i] = "turn_limit"
                    break
                outs = teacher.complete([[{"role": "user", "content": user_turn_prompt(convs[i])}] for i in live], [
                    sampling(cfg.sampling, seed(i, 1)) for i in live])
                for i, out in zip(live, outs):
                    text = clean_turn(out.text)
                    earlier = [m["content"] for m in convs[i] if m["role"] == "user"]
                    if END.lower() in text.lower():
                        why[i] = "user_ended"
                        continue
                    bad = is_degenerate(text, earlier, cfg.max_repetition, cfg.max_similarity)
                    if bad:
                        why[i] = f"user_{bad}"
                    else:
                        convs[i].append({"role": "user", "content": text})
            for topic, conv, reason in zip(chunk, convs, why):
                stops[reason or "turn_limit"] += 1
                if len(conv) < 2:
                    rejected += 1
                    continue
                turns_hist[len(conv) // 2] += 1
                gen.writer.write(Conversation(messages=conv, source="self-chat",
                                              meta={"topic": topic, "stop_reason": reason}))
                written += 1
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(cache_hits=teacher.stats["cache_hits"], refresh=False)
    counts = {"records": written, "conversations": n, "rejected": {"no_usable_answer": rejected},
              "stop_reasons": dict(sorted(stops.items())), "turns": {str(k): v for k, v in sorted(turns_hist.items())},
              "teacher": gen.teacher_counts()}
    gen.finish(counts, timer.seconds, inputs=[cfg.topics] if cfg.topics else None)
    return counts
