"""Load test for `protege serve`: throughput and p50/p95 time-to-first-token and latency at 1/8/32 clients.

    python benchmarks/serve_load.py                      # gemma-3-270m, 1/8/32 clients
    python benchmarks/serve_load.py --clients 1 8 32 --max-tokens 64 --rounds 2

Starts `protege serve MODEL` in a subprocess on a free loopback port, then runs C concurrent streaming
clients (each sends `--rounds` requests one after another, every prompt distinct). Throughput is
completion tokens (from the server's usage counts) over wall time. Goal: aggregate tokens/s at 32
clients >= 3x one client's, which continuous batching must deliver. When llama-cpp-python is
installed, its OpenAI server runs the same load on the alias's GGUF for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import httpx

TOPICS = ["the sea", "a red bicycle", "photosynthesis", "the moon", "bread baking", "a lost key", "winter",
          "prime numbers", "the Roman empire", "a jazz band", "volcanoes", "a chess game", "coffee", "trains",
          "honey bees", "the desert", "a lighthouse", "clouds", "a robot", "friendship"]


def prompt(i: int) -> str:
    return f"Write a few sentences about {TOPICS[i % len(TOPICS)]} (request {i})."


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, timeout: float = 300.0) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not come up at {url}")


async def one_request(client: httpx.AsyncClient, url: str, model: str, text: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload.get("usage"):
                usage = payload["usage"]
            for c in payload.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    tokens = usage["completion_tokens"] if usage else chunks  # a server without usage: one chunk ~ one token
    return {"ttft": ttft if ttft is not None else latency, "latency": latency, "tokens": tokens}


async def run_load(url: str, model: str, clients: int, rounds: int, max_tokens: int, offset: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(w: int) -> list[dict]:
            return [await one_request(client, url, model, prompt(offset + w * rounds + k), max_tokens)
                    for k in range(rounds)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    lats = sorted(r["latency"] for r in results)
    tokens = sum(r["tokens"] for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tok_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts), "ttft_p95": pct(ttfts, 0.95),
            "lat_p50": statistics.median(lats), "lat_p95": pct(lats, 0.95)}


def bench_server(name: str, url: str, model: str, args: argparse.Namespace) -> list[dict]:
    asyncio.run(run_load(url, model, 1, 1, 8, offset=10_000))  # warm-up: first forward passes, allocations
    rows = []
    for i, c in enumerate(args.clients):
        row = asyncio.run(run_load(url, model, c, args.rounds, args.max_tokens, offset=i * 1000))
        rows.append(row)
        print(f"{name:<10} {c:>7} {row['requests']:>8} {row['tokens']:>7} {row['wall_s']:>7.1f} "
              f"{row['tok_per_s']:>8.1f} {row['ttft_p50']:>8.2f} {row['ttft_p95']:>8.2f} "
              f"{row['lat_p50']:>7.2f} {row['lat_p95']:>7.2f}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="alias or folder to serve (default: %(default)s)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--max-batch", type=int, default=32, help="protege serve --max-batch")
    args = ap.parse_args()

    print(f"# {args.model}: {args.rounds} requests per client, max_tokens {args.max_tokens}, greedy; "
          f"{os.cpu_count()} CPUs (shared machine: absolute numbers are noisy, compare ratios)")
    print(f"{'server':<10} {'clients':>7} {'requests':>8} {'tokens':>7} {'wall_s':>7} {'tok/s':>8} "
          f"{'ttft_p50':>8} {'ttft_p95':>8} {'lat_p50':>7} {'lat_p95':>7}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "protege.cli", "serve", args.model, "--port", str(port),
                  "--max-batch", str(args.max_batch), "--name", "bench"], url)
    try:
        rows = bench_server("protege", url, "bench", args)
    finally:
        proc.terminate()
        proc.wait(30)
    by_c = {r["clients"]: r for r in rows}
    if 1 in by_c and max(by_c) > 1:
        top = max(by_c)
        ratio = by_c[top]["tok_per_s"] / by_c[1]["tok_per_s"]
        print(f"protege: tokens/s at {top} clients / at 1 client = {ratio:.2f}x (goal >= 3x: "
              f"{'met' if ratio >= 3 else 'NOT met'})")

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp reference: skipped (llama-cpp-python is not installed; PyPI has no prebuilt wheel "
              "for it and building from source takes too long here)")
        return 0
    from protege.models import gguf_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path(args.model)),
                  "--port", str(port), "--n_ctx", "4096", "--model_alias", "bench"], url)
    try:
        ref = bench_server("llama.cpp", url, "bench", args)
    finally:
        proc.terminate()
        proc.wait(30)
    for r, q in zip(rows, ref):
        print(f"{r['clients']} clients: protege/llama.cpp tokens/s = {r['tok_per_s'] / q['tok_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
