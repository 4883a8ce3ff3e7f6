"""Can one bad client stall `protege serve`? Normal latency with and without hostile clients.

    python benchmarks/serve_abuse.py                    # smollm2-135m-instruct, 8 normal + 8 abusive clients
    python benchmarks/serve_abuse.py --attack messages  # one attack only: bodies | messages | slow | slow-headers

Starts `protege serve MODEL` on a free loopback port. Phase "idle": 8 concurrent clients send ordinary
requests; their latency is the baseline. Then, per attack, the same 8 run again while 8 other clients:
- bodies: send 5 MB bodies as fast as the server answers (4 with Content-Length, refused from the
  header; 4 chunked, refused once the running count passes the limit);
- messages: send 5,001 one-character messages (refused: --max-messages) as fast as the server answers;
- slow: open a request with a 1 MB Content-Length and trickle 16 bytes every 0.5 s, never finishing;
- slow-headers: send request headers one byte every 0.5 s (cut by --header-timeout, then reconnect).
Throughout, /health is polled every 0.2 s and the server's RSS is sampled from /proc. When an attack
stops, its clients disconnect and the server's CPU is measured over the next 2 s: work done for
clients that are gone shows up there.

Goals (issue: hostile use): normal p50 latency under each attack within 2x of idle (`ratio` lines),
/health always under 1 s, RSS bounded, server CPU after the attackers leave ~0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import free_port, one_request, prompt, start  # noqa: E402

BIG = 5 << 20
ATTACKS = ("bodies", "messages", "slow", "slow-headers")


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

    await _hammer(url, lambda: apieces() if chunked else body, stop, counts)


async def message_list_client(url: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(5001)]
    body = json.dumps({"messages": turns, "max_tokens": 4}).encode()
    await _hammer(url, lambda: body, stop, counts)


async def _hammer(url: str, body: Any, stop: asyncio.Event, counts: dict[str, int]) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            try:
                r = await client.post(url + "/v1/chat/completions", content=body(),
                                      headers={"Content-Type": "application/json"})
                counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1
            except httpx.HTTPError as err:  # a server may close the connection mid-upload: also a refusal
                counts[type(err).__name__] = counts.get(type(err).__name__, 0) + 1


async def slow_client(url: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """Headers for a 1 MB body, then 16 bytes every 0.5 s until the attack ends (then it hangs up)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {1 << 20}\r\n\r\n".encode())
    sent = 0
    try:
        while not stop.is_set() and sent < (1 << 20) - 16:
            writer.write(b'{"messages": [ ' if sent == 0 else b" " * 16)
            await writer.drain()
            sent += 16
            await asyncio.sleep(0.5)
        counts["held_to_end"] = counts.get("held_to_end", 0) + 1
    except (ConnectionError, OSError) as err:
        counts[type(err).__name__] = counts.get(type(err).__name__, 0) + 1
    finally:
        writer.close()


async def slow_headers_client(url: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """Request headers one byte every 0.5 s, reconnecting whenever the server cuts the connection (408)."""
    host, port = url.removeprefix("http://").split(":")
    head = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nX-Pad: {'a' * 4000}\r\n\r\n".encode()
    while not stop.is_set():
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in range(len(head)):
                if stop.is_set() or reader.at_eof():
                    break
                writer.write(head[i:i + 1])
                await writer.drain()
                try:
                    reply = await asyncio.wait_for(reader.read(200), timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                key = reply.split(b"\r\n", 1)[0].decode("latin-1", "replace") or "closed"
                counts[key] = counts.get(key, 0) + 1
                break
            else:
                counts["held_to_end"] = counts.get("held_to_end", 0) + 1
        except (ConnectionError, OSError) as err:
            counts[type(err).__name__] = counts.get(type(err).__name__, 0) + 1
        finally:
            writer.close()


async def monitor(url: str, pid: int, stop: asyncio.Event, health: list[float], rss: list[float]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = await client.get(url + "/health")
            r.raise_for_status()
            health.append(time.perf_counter() - t0)
            rss.append(rss_mb(pid))
            await asyncio.sleep(0.2)


async def phase(url: str, model: str, pid: int, args: argparse.Namespace, abuse: str | None, offset: int) -> dict:
    import resource

    stop = asyncio.Event()
    cpu0, me0, t0 = cpu_s(pid), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    health: list[float] = []
    rss: list[float] = []
    counts: dict[str, int] = {}
    mon = asyncio.create_task(monitor(url, pid, stop, health, rss))
    attackers = {"bodies": lambda i: abusive_client(url, i % 2 == 1, stop, counts),
                 "messages": lambda i: message_list_client(url, stop, counts),
                 "slow": lambda i: slow_client(url, stop, counts),
                 "slow-headers": lambda i: slow_headers_client(url, stop, counts)}
    bad = [asyncio.create_task(attackers[abuse](i)) for i in range(args.abusers)] if abuse else []
    if abuse:
        await asyncio.sleep(1.0)  # let the flood start first
    lat = await normal_clients(url, model, args.clients, args.max_tokens, offset)
    stop.set()
    await asyncio.gather(mon, *bad)
    me1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - t0
    server_cpu = cpu_s(pid) - cpu0
    client_cpu = (me1.ru_utime + me1.ru_stime) - (me0.ru_utime + me0.ru_stime)
    after0 = cpu_s(pid)
    await asyncio.sleep(2.0)  # the attackers are gone: what the server still burns is work for nobody
    return {"cores_server": server_cpu / wall, "cores_clients": client_cpu / wall, "p50": statistics.median(lat),
            "max": max(lat), "health_max": max(health), "health_n": len(health), "rss_max": max(rss),
            "rss_min": min(rss), "refused": counts, "cpu_after_s": cpu_s(pid) - after0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--abusers", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--attack", choices=["all", *ATTACKS], default="all")
    args = ap.parse_args()
    attacks = list(ATTACKS) if args.attack == "all" else [args.attack]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "protege.cli", "serve", args.model, "--port", str(port)], url)
    rows: list[tuple[str, dict]] = []
    try:
        asyncio.run(normal_clients(url, args.model, 1, 8, 10_000))  # warm-up
        rows.append(("idle", asyncio.run(phase(url, args.model, proc.pid, args, None, 0))))
        for attack in attacks:
            rows.append((attack, asyncio.run(phase(url, args.model, proc.pid, args, attack, 0))))
            if attack == "bodies":  # RSS must not keep growing with more large bodies
                rows.append(("bodies again", asyncio.run(phase(url, args.model, proc.pid, args, attack, 0))))
    finally:
        proc.terminate()
        proc.wait(30)
    for name, r in rows:
        print(f"{name:<12} normal p50 {r['p50']:.2f} s, max {r['max']:.2f} s; /health max {r['health_max']:.3f} s "
              f"over {r['health_n']} polls; RSS {r['rss_min']:.0f}-{r['rss_max']:.0f} MB; refused {r['refused']}; "
              f"cores busy: server {r['cores_server']:.2f}, benchmark clients {r['cores_clients']:.2f}; "
              f"server CPU in the 2 s after: {r['cpu_after_s']:.2f} s")
    idle = rows[0][1]
    for name, r in rows[1:]:
        ratio = r["p50"] / idle["p50"]
        print(f"latency ratio ({name} / idle, normal p50): {ratio:.2f} (goal <= 2.0: {'met' if ratio <= 2 else 'MISSED'})")
    worst = max(r["health_max"] for _, r in rows[1:])
    print(f"/health worst under attack: {worst:.3f} s (goal < 1 s: {'met' if worst < 1 else 'MISSED'})")
    print("RSS peak (MB): " + ", ".join(f"{name} {r['rss_max']:.0f}" for name, r in rows))
    after = max(r["cpu_after_s"] for _, r in rows[1:])
    print(f"server CPU in the 2 s after an attack ends: at most {after:.2f} s (goal ~0: "
          f"{'met' if after < 0.2 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
