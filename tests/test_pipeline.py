"""The recipe runner with two small stages defined here (real files, real subprocess kill)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import Field

from protege import pipeline
from protege.config import ConfigError, StageConfig


class CountConfig(StageConfig):
    out_dir: str = Field("", description="output folder")
    n: int = Field(5, description="how many lines to write")
    sleep: float = Field(0.0, description="seconds per line (to be killable)")


def run_count(config: CountConfig) -> dict:
    """Writes n lines, one per step, resuming after the lines already there (like a real stage)."""
    out = Path(config.out_dir) / "lines.txt"
    have = out.read_text().splitlines() if out.exists() else []
    with out.open("a") as fh:
        for i in range(len(have), config.n):
            time.sleep(config.sleep)
            fh.write(f"{i}\n")
            fh.flush()
    return {"lines": config.n, "resumed_from": len(have)}


class SumConfig(StageConfig):
    out_dir: str = Field("", description="output folder")
    src: str = Field(..., description="file of numbers")


def run_sum(config: SumConfig) -> dict:
    total = sum(int(x) for x in Path(config.src).read_text().split())
    (Path(config.out_dir) / "sum.txt").write_text(str(total))
    return {"sum": total}


@pytest.fixture(autouse=True)
def _kinds(monkeypatch):
    monkeypatch.setitem(pipeline.STAGE_KINDS, "test.count", pipeline.StageKind("test_pipeline:CountConfig:run_count", "count"))
    monkeypatch.setitem(pipeline.STAGE_KINDS, "test.sum", pipeline.StageKind("test_pipeline:SumConfig:run_sum", "sum"))


def _recipe(tmp_path, n=5, sleep=0.0):
    text = f"""
name: demo
runs_dir: {tmp_path / 'runs'}
stages:
  - name: count
    kind: test.count
    config: {{n: {n}, sleep: {sleep}}}
  - name: total
    kind: test.sum
    config: {{src: "${{count}}/lines.txt"}}
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_runs_then_skips_then_reruns_changed(tmp_path):
    path = _recipe(tmp_path)
    rows = pipeline.run_recipe(pipeline.load_recipe(path))
    assert [r["status"] for r in rows] == ["ran", "ran"] and rows[1]["result"]["sum"] == 10
    rows = pipeline.run_recipe(pipeline.load_recipe(path))
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    # a changed upstream config reruns it and everything that refers to it
    rows = pipeline.run_recipe(pipeline.load_recipe(path, ["count.n=6"]))
    assert [r["status"] for r in rows] == ["ran", "ran"] and rows[1]["result"]["sum"] == 15
    assert rows[0]["result"]["resumed_from"] == 0  # stale folder was cleared, not resumed
    rows = pipeline.run_recipe(pipeline.load_recipe(path, ["count.n=6"]), only="total")
    assert [r["status"] for r in rows] == ["not selected", "ran"]
    rows = pipeline.run_recipe(pipeline.load_recipe(path, ["count.n=6"]), from_stage="total")
    assert [r["status"] for r in rows] == ["skipped", "ran"]


def test_recipe_errors(tmp_path):
    path = _recipe(tmp_path)
    with pytest.raises(ConfigError, match="no stage named `cnt`"):
        pipeline.load_recipe(path, ["cnt.n=3"])
    with pytest.raises(ConfigError, match="did you mean `n`"):
        pipeline.run_recipe(pipeline.load_recipe(path, ["count.nn=3"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - name: a\n    kind: test.cuont\n")
    with pytest.raises(ConfigError, match="did you mean `test.count`"):
        pipeline.run_recipe(pipeline.load_recipe(bad))
    bad.write_text("name: x\nstages:\n  - name: a\n    kind: test.sum\n    config: {src: '${later}/x'}\n")
    with pytest.raises(ConfigError, match="does not name an earlier stage"):
        pipeline.run_recipe(pipeline.load_recipe(bad))


def test_killed_stage_resumes(tmp_path):
    """kill -9 in the middle of a stage; the rerun keeps its partial output and finishes it."""
    path = _recipe(tmp_path, n=40, sleep=0.05)
    code = ("import sys; sys.path.insert(0, %r); from protege.cli import main; from protege import pipeline; "
            "pipeline.STAGE_KINDS['test.count']=pipeline.StageKind('test_pipeline:CountConfig:run_count', ''); "
            "pipeline.STAGE_KINDS['test.sum']=pipeline.StageKind('test_pipeline:SumConfig:run_sum', ''); sys.exit(main(['run', %r]))"
            % (str(Path(__file__).parent), str(path)))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    lines = tmp_path / "runs" / "demo" / "01-count" / "lines.txt"
    deadline = time.time() + 60
    while time.time() < deadline and (not lines.exists() or len(lines.read_text().splitlines()) < 10):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(lines.read_text().splitlines())
    assert 10 <= partial < 40
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "resuming an interrupted run" in proc.stderr
    assert lines.read_text().split() == [str(i) for i in range(40)]
    summary = json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())
    assert summary[0]["result"]["resumed_from"] == partial and summary[1]["result"]["sum"] == sum(range(40))


def test_recipe_killed_during_sft_resumes_from_checkpoint(tmp_path, tiny_llama_dir):
    """kill -9 a real `protege run` while its SFT stage trains; the rerun resumes SFT from its checkpoint."""
    from protege.records import Conversation, write_records

    data = tmp_path / "chats.jsonl"
    write_records(data, [Conversation([{"role": "user", "content": f"What is {i} plus {i}?"},
                                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}])
                         for i in range(40)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: killed
runs_dir: {tmp_path / 'runs'}
stages:
  - name: sft
    kind: train.sft
    config: {{model: "{tiny_llama_dir}", datasets: ["{data}"], max_steps: 400, batch_size: 1, packing: false,
              max_length: 32, save_every: 5, eval_fraction: 0.0, tensorboard: false}}
""")
    cmd = [sys.executable, "-m", "protege.cli", "run", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpts = tmp_path / "runs" / "killed" / "01-sft" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts.exists() and any(p.name.startswith("step-") for p in ckpts.iterdir())):
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(p.name.startswith("step-") for p in ckpts.iterdir()), "no checkpoint before the kill"
    assert not (tmp_path / "runs" / "killed" / "01-sft" / ".protege_done.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sft: resuming an interrupted run" in done.stderr
    assert "resuming from checkpoint" in done.stderr
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "killed" / "01-sft" / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == 400


def test_an_input_inside_its_own_stage_folder_is_refused_before_anything_is_deleted(tmp_path):
    """Issue 31: the runner cleared a stage's folder (input included) before the overwrite check could run."""
    path = _recipe(tmp_path)
    pipeline.run_recipe(pipeline.load_recipe(path))
    own = tmp_path / "runs" / "demo" / "02-total" / "numbers.txt"
    own.write_text("1 2 3\n")
    with pytest.raises(ConfigError, match=r"stage total: input .*numbers.txt lies inside the stage's own folder"):
        pipeline.run_recipe(pipeline.load_recipe(path, [f"total.src={own}"]))
    assert own.read_text() == "1 2 3\n"


def test_set_reaches_a_stage_whose_name_has_a_hyphen(tmp_path):
    """`--set sft-40.model=X` (docs/recipes/alpaca.md) was refused: override keys come back with `-` as `_`."""
    path = tmp_path / "r.yaml"
    path.write_text("name: probe\nstages:\n  - name: sample-40\n    kind: data.sample\n    config: {src: a.jsonl, n: 40}\n")
    recipe = pipeline.load_recipe(path, ["sample-40.n=3"])
    assert recipe.stages[0].config["n"] == 3


def test_skip_leaves_a_stage_out_and_refuses_a_stage_that_still_reads_it(tmp_path):
    """`--skip count --set total.src=FILE`: the user's file replaces what the skipped stage would write."""
    path = _recipe(tmp_path)
    path.write_text(path.read_text().replace("stages:\n", "stages:\n  - {name: first, kind: test.count, config: {n: 1}}\n"))
    with pytest.raises(ConfigError, match=r"reads `\$\{count\}`, which --skip leaves out.*--set total"):
        pipeline.run_recipe(pipeline.load_recipe(path), skip=["count"])
    assert not (tmp_path / "runs" / "demo" / "01-first").exists()  # refused before anything ran
    mine = tmp_path / "mine.txt"
    mine.write_text("40\n2\n")
    rows = pipeline.run_recipe(pipeline.load_recipe(path, [f"total.src={mine}"]), skip=["count"])
    assert [r["status"] for r in rows] == ["ran", "left out", "ran"]
    assert not (tmp_path / "runs" / "demo" / "02-count").exists()
    assert (tmp_path / "runs" / "demo" / "03-total" / "sum.txt").read_text() == "42"
    with pytest.raises(ConfigError, match="--skip nope: no such stage"):
        pipeline.run_recipe(pipeline.load_recipe(path), skip=["nope"])


def test_set_reaches_list_items_by_index(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: probe\nstages:\n  - name: c\n    kind: curate\n"
                    "    config: {inputs: [a.jsonl], steps: [clean, {step: split, max_tokens: 512}]}\n")
    recipe = pipeline.load_recipe(path, ["c.steps.1.max_tokens=2048"])
    assert recipe.stages[0].config["steps"] == ["clean", {"step": "split", "max_tokens": 2048}]
    with pytest.raises(ConfigError, match=r"`steps.5`: `steps` has 2 items"):
        pipeline.load_recipe(path, ["c.steps.5.max_tokens=1"])
