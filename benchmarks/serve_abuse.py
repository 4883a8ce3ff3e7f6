"""Can one bad client stall `protege serve`? Normal streaming latency with and without 5 MB bodies arriving.

    python benchmarks/serve_abuse.py                    # smollm2-135m-instruct, 8 normal + 8 abusive clients

Starts `protege serve MODEL` on a free loopback port. Phase 1 (idle): 8 concurrent streaming clients
send ordinary requests; their latency is the baseline. Phase 2 (abuse): the same 8 run again while 8
other clients send 5 MB bodies as fast as the server answers (4 with Content-Length, refused from the
header; 4 chunked, refused once the running count passes the limit). Throughout, /health is polled
every 0.2 s and the server's RSS is sampled from /proc.

Goals (issue: hardening): normal p50 latency under abuse within 2x of idle (`ratio` line), /health
always under 1 s, RSS bounded (no growth with the number of large bodies).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import free_port, one_request, prompt, start  # noqa: E402

BIG = 5 << 20


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def normal_clients(url: str, model: str, n: int, max_tokens: int, offset: int) -> list[float]:
    async with httpx.AsyncClient(timeout=600) as client:
        rows = await asyncio.gather(*(one_request(client, url, model, prompt(offset + i), max_tokens)
                                      for i in range(n)))
    return [r["latency"] for r in rows]


async def abusive_client(url: str, chunked: bool, stop: asyncio.Event, counts: dict[str, int]) -> None:
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * BIG + b'"}]}'

    def pieces():
        for i in range(0, len(body), 64 << 10):
            yield body[i:i + (64 << 10)]

    async def apieces():
        for p in pieces():
            yield p

    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            try:
                r = await client.post(url + "/v1/chat/completions", content=apieces() if chunked else body,
                                      headers={"Content-Type": "application/json"})
                counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1
            except httpx.HTTPError as err:  # a server may close the connection mid-upload: also a refusal
                counts[type(err).__name__] = counts.get(type(err).__name__, 0) + 1


async def monitor(url: str, pid: int, stop: asyncio.Event, health: list[float], rss: list[float]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = await client.get(url + "/health")
            r.raise_for_status()
            health.append(time.perf_counter() - t0)
            rss.append(rss_mb(pid))
            await asyncio.sleep(0.2)


async def phase(url: str, model: str, pid: int, args: argparse.Namespace, abuse: bool, offset: int) -> dict:
    import resource

    stop = asyncio.Event()
    cpu0, me0, t0 = cpu_s(pid), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    health: list[float] = []
    rss: list[float] = []
    counts: dict[str, int] = {}
    mon = asyncio.create_task(monitor(url, pid, stop, health, rss))
    bad = [asyncio.create_task(abusive_client(url, i % 2 == 1, stop, counts)) for i in range(args.abusers if abuse else 0)]
    if abuse:
        await asyncio.sleep(1.0)  # let the flood start first
    lat = await normal_clients(url, model, args.clients, args.max_tokens, offset)
    stop.set()
    await asyncio.gather(mon, *bad)
    me1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - t0
    server_cpu = cpu_s(pid) - cpu0
    client_cpu = (me1.ru_utime + me1.ru_stime) - (me0.ru_utime + me0.ru_stime)
    return {"cores_server": server_cpu / wall, "cores_clients": client_cpu / wall, "p50": statistics.median(lat), "max": max(lat), "health_max": max(health), "health_n": len(health),
            "rss_max": max(rss), "rss_min": min(rss), "refused": counts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--abusers", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "protege.cli", "serve", args.model, "--port", str(port)], url)
    try:
        asyncio.run(normal_clients(url, args.model, 1, 8, 10_000))  # warm-up
        idle = asyncio.run(phase(url, args.model, proc.pid, args, False, 0))
        hostile = asyncio.run(phase(url, args.model, proc.pid, args, True, 0))
        hostile2 = asyncio.run(phase(url, args.model, proc.pid, args, True, 0))  # RSS must not keep growing
    finally:
        proc.terminate()
        proc.wait(30)
    for name, r in (("idle", idle), ("abuse", hostile), ("abuse again", hostile2)):
        print(f"{name:<12} normal p50 {r['p50']:.2f} s, max {r['max']:.2f} s; /health max {r['health_max']:.3f} s "
              f"over {r['health_n']} polls; RSS {r['rss_min']:.0f}-{r['rss_max']:.0f} MB; refused {r['refused']}; "
              f"cores busy: server {r['cores_server']:.2f}, benchmark clients {r['cores_clients']:.2f}")
    ratio = hostile["p50"] / idle["p50"]
    print(f"latency ratio (abuse / idle, normal p50): {ratio:.2f} (goal <= 2.0: {'met' if ratio <= 2 else 'MISSED'})")
    worst = max(hostile["health_max"], hostile2["health_max"])
    print(f"/health worst under abuse: {worst:.3f} s (goal < 1 s: {'met' if worst < 1 else 'MISSED'})")
    print(f"RSS peak: idle {idle['rss_max']:.0f} MB, abuse {hostile['rss_max']:.0f} MB, again {hostile2['rss_max']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
