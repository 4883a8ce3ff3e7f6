"""Issue 28: curation streams through files in chunks and runs its steps in worker processes; the output must
not depend on the chunk size or the number of workers (duplicates across chunk boundaries, stats summed
over chunks, loosely read records validated, every removal listed)."""

from __future__ import annotations

import json
import random

import pytest

from protege.curate import CurateConfig, run
from test_curate_steps import WORDS, conv, text

GERMAN = "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden".split()


def _inputs(tmp_path):
    rng = random.Random(3)
    rows = []
    for i in range(120):
        r = rng.random()
        if rows and r < 0.15:  # exact copy of an earlier record, possibly many chunks back
            rows.append(dict(rng.choice(rows), id=f"x{i}"))
        elif rows and r < 0.25:  # near copy: same answer plus a word, different question
            base = rng.choice(rows)
            rows.append(conv(text(rng, 12), base["messages"][1]["content"] + " " + rng.choice(WORDS), f"n{i}").to_dict())
        elif r < 0.32:
            rows.append(conv(" ".join(rng.choices(GERMAN, k=20)), " ".join(rng.choices(GERMAN, k=40)), f"de{i}").to_dict())
        elif r < 0.36:  # contaminated: an eval prompt as the question
            rows.append(conv(f"eval question number {i % 3} asks about the silver lantern by the narrow canyon today",
                             text(rng, 30), f"c{i}").to_dict())
        else:
            rows.append(conv(text(rng, 14), text(rng, 40), f"r{i}").to_dict())
    rows.insert(50, {"id": "loose", "messages": [{"role": "user", "content": "a question with an answer"},
                                                  {"role": "user", "content": "asked twice"},
                                                  {"role": "assistant", "content": "<b>an answer that cleaning keeps</b>"}]})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"id": f"q{k}", "prompt": f"eval question number {k} asks about the silver "
                                         "lantern by the narrow canyon today"}) + "\n" for k in range(3)))
    return src, evals


def _curate(tmp_path, name, src, evals, **kw):
    steps = [{"step": "clean"}, {"step": "dedup", "threshold": 0.6}, {"step": "language"},
             {"step": "decontaminate", "eval_sets": [str(evals)]}, {"step": "quality"}]
    out = tmp_path / name
    summary = run(CurateConfig(inputs=[str(src)], out_dir=str(out), steps=steps, **kw))
    manifest = json.loads((out / "manifest.json").read_text())
    return summary, (out / "records.jsonl").read_text(), (out / "removed.jsonl").read_text(), manifest


@pytest.mark.parametrize("chunk,workers", [(7, 1), (7, 2), (16, 0)])
def test_chunks_and_workers_do_not_change_the_output(tmp_path, monkeypatch, chunk, workers):
    from protege.curate import stream

    src, evals = _inputs(tmp_path)
    whole = _curate(tmp_path, "whole", src, evals)
    monkeypatch.setattr(stream, "CHUNK", chunk)
    chunked = _curate(tmp_path, "chunked", src, evals, workers=workers)
    assert chunked[0] == whole[0]
    assert chunked[1] == whole[1] and chunked[2] == whole[2]
    def timeless(steps):
        return [{k: v for k, v in s.items() if k != "seconds"} for s in steps]

    assert timeless(chunked[3]["steps"]) == timeless(whole[3]["steps"])  # per-step counts and reasons
    assert chunked[3]["contamination"] == whole[3]["contamination"] and chunked[3]["counts"] == whole[3]["counts"]
    removed = [json.loads(x) for x in whole[2].splitlines()]
    reasons = {e["reason"] for e in removed}
    assert {"exact_duplicate", "near_duplicate", "language", "contamination"} <= reasons
    kept = [json.loads(x) for x in whole[1].splitlines()]
    assert "loose" in {r["id"] for r in kept} and all("_unchecked" not in r["meta"] for r in kept)
    assert whole[0]["in"] + whole[0]["added"] == len(kept) + len(removed)
    hit = whole[3]["contamination"]
    assert hit["eval_sets"]["eval.jsonl"] == {"prompts": 3, "prompts_hit": 3}


def test_lima_selection_keeps_the_best_of_each_prompt_cluster(tmp_path):
    """Issue 30 (LIMA): quality and diversity. Three topics; the five best scores are all one topic's, so the
    top 3 overall are one topic, while `top_k_diverse` keeps the best record of each topic."""
    topics = {"cook": "how do I cook rice pasta soup beans in a pot", "space": "why do stars planets orbit the sun moon",
              "code": "write a python function loop list sort code"}
    rows, score = [], {"cook": 10.0, "space": 5.0, "code": 1.0}
    for t, words in topics.items():
        for j in range(5):
            rows.append(conv(f"{words} question {j}", f"an answer about {t} number {j}", f"{t}{j}").to_dict()
                        | {"meta": {"rm_score": score[t] - j * 0.1}})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def kept(**opts):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        run(CurateConfig(inputs=[str(src)], out_dir=str(out),
                         steps=[{"step": "quality", "top_k_by": "rm_score", "top_k": 3, **opts}]))
        return [json.loads(x)["id"] for x in (out / "records.jsonl").read_text().splitlines()]

    assert kept() == ["cook0", "cook1", "cook2"]
    assert kept(top_k_diverse=True) == ["cook0", "space0", "code0"]


def test_score_step_writes_the_reward_models_score(tmp_path):
    """Issue 30 (LIMA): `score` puts a reward model's score into meta for top_k_by, equal to train.rm.score."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from protege.chat import ChatFormat
    from protege.train.rm import load_reward_model, score
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    num_labels=1, pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rng = random.Random(0)
    rows = [conv(text(rng, 8), text(rng, 12), f"r{i}").to_dict() for i in range(7)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(CurateConfig(inputs=[str(src)], out_dir=str(tmp_path / "o"),
                     steps=[{"step": "score", "model": str(tmp_path / "rm"), "batch_size": 3}]))
    out = [json.loads(x) for x in (tmp_path / "o" / "records.jsonl").read_text().splitlines()]
    model, t = load_reward_model(str(tmp_path / "rm"))
    want = score(model, ChatFormat.from_tokenizer(t), [r["messages"][:-1] for r in rows],
                 [r["messages"][-1]["content"] for r in rows])
    got = [r["meta"]["rm_score"] for r in out]
    assert got == pytest.approx(want, abs=1e-5) and len(set(got)) == len(got)


@pytest.mark.slow
def test_a_ray_cluster_gives_the_output_of_one_worker(tmp_path, monkeypatch):
    """`ray_address`: the per-record steps and dedup's signing run as Ray tasks on a cluster (`ray start --head`
    in its own processes, joined by address like a remote one) or on a local instance, results back in order:
    the same files."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    pytest.importorskip("ray")
    from protege.curate import stream
    from protege.serve import free_port

    src, evals = _inputs(tmp_path)
    whole = _curate(tmp_path, "whole", src, evals)
    monkeypatch.setattr(stream, "CHUNK", 16)
    port = free_port()
    # Ray >= 2.5x turns token auth on for a new local instance and keeps the token in ~/.ray; a token left there
    # by an earlier run on this machine would make the head and this driver disagree. The test cluster runs
    # without it (a real cluster's operator chooses).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    ray_bin = Path(sys.executable).parent / "ray"
    # --block: the head lives as long as this process, so stopping it stops only this cluster
    head = subprocess.Popen([str(ray_bin) if ray_bin.exists() else "ray", "start", "--head", "--block",
                             "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        for _ in range(120):  # the head's GCS port opens once it is up
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        on_ray = _curate(tmp_path, "ray", src, evals, ray_address=f"127.0.0.1:{port}")
    finally:
        head.terminate()
        head.wait(timeout=60)
        # `ray start` names its cluster in /tmp/ray/ray_current_cluster, where a later `ray.init()` with no
        # address would try to join it: forget the dead one (only ours)
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    assert on_ray[1] == whole[1] and on_ray[2] == whole[2]
    assert on_ray[0] == whole[0]
    # `local`: a Ray instance of its own on this machine, even where a `ray start` cluster was made before
    local = _curate(tmp_path, "local", src, evals, ray_address="local")
    assert local[1] == whole[1] and local[2] == whole[2]


def test_ray_address_with_no_cluster_there_says_how_to_start_one(tmp_path):
    pytest.importorskip("ray")
    from protege.errors import StageError
    from protege.serve import free_port

    src, evals = _inputs(tmp_path)
    with pytest.raises(StageError, match="no Ray cluster at ray_address.*ray start --head"):
        _curate(tmp_path, "ray", src, evals, ray_address=f"127.0.0.1:{free_port()}")
