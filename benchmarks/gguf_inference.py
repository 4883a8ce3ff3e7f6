"""protege's engine vs llama.cpp on one model: batch-1 decode speed, memory, quality; and through the server.

    python benchmarks/gguf_inference.py                       # gemma-3-270m, 128 new tokens
    python benchmarks/gguf_inference.py --export-dir DIR      # reuse a `protege export ... --gguf f16,q8_0,q4_0,q4_k_m`

Batch 1 (each row in its own process, so peak RSS is that row's): protege's engine with fp32 and int8
weights on the HF folder, and bare llama.cpp (llama-cpp-python's generate loop, greedy) on the F16,
Q8_0, Q4_0 and Q4_K_M files that `protege export` writes; 128 new tokens after a chat prompt, prompt
evaluation included. Δppl comes from the export's verify.json (same held-out token ids as HF fp32).

Server: `protege serve FILE.gguf` (llama.cpp backend) at batch 1 against bare llama.cpp (goal: within
10%), and 16 concurrent streaming clients against `protege serve` on the HF folder (protege's
continuous batching; goal >= 2x the llama.cpp backend's aggregate tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

CHILD = r"""
import json, resource, sys, time
kind, path, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
msgs = [{"role": "user", "content": sys.argv[5]}]
if kind == "llama.cpp":
    import llama_cpp
    from protege.models import load_tokenizer
    from protege.chat import ChatFormat
    chat = ChatFormat.from_tokenizer(load_tokenizer(path))
    ids = chat.encode_prompt(msgs)
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    def run():
        out = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(t)
            if len(out) >= n:
                break
        return len(out)
else:
    import torch
    torch.set_num_threads(threads)
    from protege.engine import Engine, SamplingParams
    from protege.models import load
    model, tok = load(path)
    eng = Engine(model, tok, max_batch_size=1, weights=kind)
    ids = eng.chat_format.encode_prompt(msgs)
    stop = []  # no stop ids: always n tokens, like the llama.cpp loop
    def run():
        return eng.generate([ids], SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=stop))[0].completion_tokens
run_warm = run()  # warm-up: first-call allocations, caches
t0 = time.perf_counter(); got = run(); dt = time.perf_counter() - t0
print(json.dumps({"tokens": got, "seconds": dt, "tok_s": got / dt,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(kind: str, path: str, n: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, path, str(n), str(threads), PROMPT],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {path} failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_rows(target: str, args: argparse.Namespace, clients: int, rounds: int, extra: list[str]) -> dict:
    from serve_load import free_port, run_load, start

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "protege.cli", "serve", target, "--port", str(port), *extra], url)
    try:
        asyncio.run(run_load(url, "m", 1, 1, 8, offset=10_000))
        return asyncio.run(run_load(url, "m", clients, rounds, args.tokens, offset=0))
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--export-dir", default="benchmarks/.cache/gguf-gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.export_dir)
    types = ["f16", "q8_0", "q4_0", "q4_k_m"]
    if not all((out / f"{out.name}-{t}.gguf").is_file() for t in types) or not (out / "verify.json").is_file():
        print(f"exporting {args.model} to {out} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "protege.cli", "export", args.model, "--out", str(out),
                        "--gguf", ",".join(types)], check=True, capture_output=True)
    verify = json.loads((out / "verify.json").read_text())
    dppl = {r["type"]: (r["ppl"], r["delta_ppl"], r["size_mb"]) for r in verify["perplexity"]["rows"]}
    hf = str(out / "hf")
    print(f"batch 1, {args.tokens} new tokens, {args.threads} threads, prompt eval included")
    print(f"{'backend':<22} {'tok/s':>8} {'peak RSS MB':>12} {'size MB':>8} {'ppl':>8} {'Δppl':>7}")
    rows = {}
    for kind in ("fp32", "int8"):
        r = rows[f"protege {kind}"] = child(kind, hf, args.tokens, args.threads)
        print(f"{'protege engine ' + kind:<22} {r['tok_s']:>8.1f} {r['rss_mb']:>12.0f} {'':>8} "
              f"{verify['perplexity']['hf_fp32'] if kind == 'fp32' else float('nan'):>8.3f} {'':>7}", flush=True)
    for t in types:
        r = rows[f"llama.cpp {t}"] = child("llama.cpp", str(out / f"{out.name}-{t}.gguf"), args.tokens, args.threads)
        ppl, d, size = dppl[t]
        print(f"{'llama.cpp ' + t:<22} {r['tok_s']:>8.1f} {r['rss_mb']:>12.0f} {size:>8.0f} {ppl:>8.3f} {d:>+7.3f}", flush=True)
    stretch = rows["protege int8"]["tok_s"] / rows["llama.cpp q8_0"]["tok_s"]
    print(f"engine int8 / llama.cpp Q8_0 ratio: {stretch:.2f} (stretch goal >= 0.8: {'met' if stretch >= 0.8 else 'missed'})")

    q4km = str(out / f"{out.name}-q4_k_m.gguf")
    one = serve_rows(q4km, args, 1, 3, ["--backend", "llama.cpp"])
    bare = rows["llama.cpp q4_k_m"]["tok_s"]
    ratio = one["tok_per_s"] / bare
    print(f"protege serve Q4_K_M (llama.cpp backend), 1 client: {one['tok_per_s']:.1f} tok/s vs bare llama.cpp "
          f"{bare:.1f}: ratio {ratio:.2f} (goal >= 0.90: {'met' if ratio >= 0.9 else 'missed'}; the HTTP path "
          f"includes prompt evaluation and SSE per token)")
    c_llama = serve_rows(q4km, args, 16, 1, ["--backend", "llama.cpp"])
    c_torch = serve_rows(hf, args, 16, 1, ["--max-batch", "16"])
    r16 = c_torch["tok_per_s"] / c_llama["tok_per_s"]
    print(f"16 concurrent clients: protege engine (fp32, continuous batching) {c_torch['tok_per_s']:.1f} tok/s, "
          f"llama.cpp backend (Q4_K_M, one sequence at a time) {c_llama['tok_per_s']:.1f} tok/s: ratio {r16:.2f} "
          f"(goal >= 2: {'met' if r16 >= 2 else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
