"""A real OpenAI-format HTTP server on 127.0.0.1 for teacher tests (run as a subprocess).

    python tests/fake_openai_server.py --fail-rate 0.2 --latency 0.1   # prints "PORT <n>"

A minimal asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) rather than a
framework, because it must be able to *drop* a connection without answering.
Answers echo the last user message ("echo: ..."). Failures (chosen by a seeded RNG,
`--fail-rate`) cycle through 429 (with Retry-After: 0), 500 and a dropped connection.
`GET /stats` returns how many times each distinct request was answered successfully.
The model name `hard-401` always gets 401, `slow` answers after 5 s, and `scripted` plays a
deterministic teacher for the generator tests (see `_scripted`). A chat request whose last user turn
contains "RAMBLE" is answered with finish_reason "length" (an answer cut at the token limit).
It runs in its own process so its CPU time does not compete with the client's GIL.

The Batch API is there too: `POST /v1/files` (multipart, purpose `batch`), `POST /v1/batches`,
`GET /v1/batches/{id}`, `GET /v1/files/{id}/content`. A batch answers its lines one by one in the
background (`--batch-delay` seconds each) through the same `_answer`, so `/stats` counts what was paid for;
`batches_created` counts batches. A request the model `hard-401` makes lands in the batch's error file.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
from collections import Counter

class FakeServer:
    """Client-side handle for tests: starts this file as a subprocess, `.url` is its /v1 root."""

    def __init__(self, *args: str):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("PORT "), line
        self.url = f"http://127.0.0.1:{int(line.split()[1])}/v1"

    def stats(self) -> dict:
        import httpx

        return httpx.get(self.url.replace("/v1", "/stats"), timeout=10).json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


STATE = {"successes": Counter(), "attempts": 0, "failures": Counter(), "batches_created": 0}
FILES: dict[str, bytes] = {}
BATCHES: dict[str, dict] = {}


def _multipart_file(content_type: str, raw: bytes) -> bytes:
    from email.parser import BytesParser
    from email.policy import default

    msg = BytesParser(policy=default).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True)
    raise ValueError("no file part")


async def _run_batch(batch: dict, args: argparse.Namespace, rng: random.Random) -> None:
    batch["status"] = "in_progress"
    lines = [json.loads(x) for x in FILES[batch["input_file_id"]].decode().splitlines() if x.strip()]
    batch["request_counts"] = {"total": len(lines), "completed": 0, "failed": 0}
    out, err = [], []
    for line in lines:
        await asyncio.sleep(args.batch_delay)
        reply = await _answer(line["body"], line["url"], argparse.Namespace(**{**vars(args), "fail_rate": 0.0}), rng)
        head, _, body = reply.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        row = {"id": f"req_{len(out) + len(err)}", "custom_id": line["custom_id"],
               "response": {"status_code": status, "request_id": "x", "body": json.loads(body)}, "error": None}
        text = json.dumps(row)
        if args.batch_cut_row is not None and len(out) + len(err) == args.batch_cut_row:
            text = text[:len(text) // 2]  # a row cut short (a truncated download): not JSON
        (out if status == 200 else err).append(text)
        batch["request_counts"]["completed" if status == 200 else "failed"] += 1
    for name, rows in (("output_file_id", out), ("error_file_id", err)):
        if rows:
            fid = f"file-{len(FILES)}"
            FILES[fid] = ("\n".join(rows) + "\n").encode()
            batch[name] = fid
    batch["status"] = "completed"


async def _batch_api(method: str, path: str, headers: dict, raw: bytes, args, rng) -> bytes | None:
    if method == "POST" and path == "/v1/files":
        fid = f"file-{len(FILES)}"
        FILES[fid] = _multipart_file(headers["content-type"], raw)
        return _response(200, {"id": fid, "object": "file", "bytes": len(FILES[fid]), "purpose": "batch"})
    if method == "POST" and path == "/v1/batches":
        body = json.loads(raw)
        if body.get("input_file_id") not in FILES:
            return _response(400, {"error": {"message": "no such file"}})
        STATE["batches_created"] += 1
        bid = f"batch_{len(BATCHES)}"
        BATCHES[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "status": "validating",
                        "input_file_id": body["input_file_id"], "output_file_id": None, "error_file_id": None,
                        "completion_window": body.get("completion_window"), "request_counts": None}
        asyncio.get_running_loop().create_task(_run_batch(BATCHES[bid], args, rng))
        return _response(200, BATCHES[bid])
    if method == "GET" and path.startswith("/v1/batches/") and path.split("/")[-1] in BATCHES:
        return _response(200, BATCHES[path.split("/")[-1]])
    if method == "GET" and path.startswith("/v1/files/") and path.endswith("/content"):
        data = FILES.get(path.split("/")[3])
        if data is None:
            return _response(404, {"error": {"message": "no such file"}})
        return (f"HTTP/1.1 200 OK\r\nContent-Type: application/jsonl\r\nContent-Length: {len(data)}\r\n\r\n"
                .encode() + data)
    return _response(404, {"error": {"message": f"no route {method} {path}"}})


def _key(body: dict) -> str:
    what = body.get("messages", body.get("prompt"))
    return hashlib.sha256(json.dumps([body.get("model"), what, body.get("seed")], sort_keys=True).encode()).hexdigest()[:16]


def _response(status: int, payload: dict, extra: str = "") -> bytes:
    data = json.dumps(payload).encode()
    reason = {200: "OK", 401: "Unauthorized", 429: "Too Many Requests", 500: "Internal Server Error"}.get(status, "X")
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"{extra}\r\n")
    return head.encode() + data


_VERBS = ["Describe", "Explain", "Summarize", "List", "Compare", "Classify", "Write", "Suggest", "Translate", "Rank"]
_THINGS = ["volcanoes", "tax forms", "jazz history", "a chess opening", "rainforests", "bread baking", "old bridges",
           "city parks", "solar sails", "ant colonies", "tea ceremonies", "river deltas", "glass making", "moon phases",
           "postal systems", "wind farms", "coral reefs", "origami cranes", "railway timetables", "desert plants"]
_ASPECTS = ["for a child", "in three bullet points", "with one example", "for a beginner", "in formal English",
            "as a short poem", "with pros and cons", "in under fifty words", "step by step", "as a table"]


def _scripted_tasks(prompt: str, seed, start: int) -> list[str]:
    """Five task lines numbered from `start`: mostly fresh tasks, plus an image task, a too-short one and a copy."""
    rng = random.Random(hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest())
    lines = []
    for k in range(start, start + 5):
        roll = rng.random()
        if roll < 0.1:
            lines.append(f"{k}. Describe the image of {rng.choice(_THINGS)}.")
        elif roll < 0.2:
            lines.append(f"{k}. Do it.")
        elif roll < 0.25:
            lines.append(f"{k}. Give three practical tips for falling asleep faster.")
        else:
            lines.append(f"{k}. {rng.choice(_VERBS)} {rng.choice(_THINGS)} {rng.choice(_ASPECTS)} "
                         f"(variant {rng.randrange(10**6)}).")
            if rng.random() < 0.3:
                lines.append(f"Input: notes about {rng.choice(_THINGS)}")
    return lines


def _scripted(messages: list, seed) -> str:
    """A deterministic chat teacher: writes tasks, plays the person in self-chat, answers with its turn number."""
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if "Come up with" in last:
        return "Sure! Here are some new tasks:\n" + "\n".join(_scripted_tasks(last, seed, 7))
    if "You are the person" in last:
        if last.count("Person:") >= 2 and "stop early" in last:
            return "[END]"
        return f"Person: Interesting, and what about {random.Random(last).choice(_THINGS)}?"
    if "EMPTY" in last:
        return ""
    if "LOOP" in last:
        return "the same words " * 30
    turn = sum(1 for m in messages if m["role"] == "assistant") + 1
    system = messages[0]["content"][:12] if messages and messages[0]["role"] == "system" else "-"
    return f"(turn {turn}, sys {system}) An answer about: {last[:60]}"


def _scripted_completion(prompt: str, seed) -> str:
    if prompt.rstrip().endswith(":") and "Task " in prompt.splitlines()[-1]:
        n = int(prompt.rstrip()[:-1].rsplit("Task ", 1)[1])
        lines = _scripted_tasks(prompt, seed, n)
        first = lines[0].split(". ", 1)[1]
        return " " + "\n".join([first] + [f"Task {ln.split('. ', 1)[0]}: {ln.split('. ', 1)[1]}" if ln[0].isdigit()
                                         else ln for ln in lines[1:]])
    return f" A completion answer for: {prompt.splitlines()[-2][:60] if len(prompt.splitlines()) > 1 else prompt}"


async def _answer(body: dict, path: str, args: argparse.Namespace, rng: random.Random) -> bytes | None:
    STATE["attempts"] += 1
    model = body.get("model", "")
    if model == "hard-401":
        return _response(401, {"error": {"message": "Incorrect API key provided"}})
    if rng.random() < args.fail_rate:
        mode = ("429", "500", "drop")[STATE["attempts"] % 3]
        STATE["failures"][mode] += 1
        await asyncio.sleep(args.fail_latency)
        if mode == "429":
            return _response(429, {"error": {"message": "rate limited"}}, "Retry-After: 0\r\n")
        if mode == "500":
            return _response(500, {"error": {"message": "boom"}})
        return None
    await asyncio.sleep(5.0 if model == "slow" else args.latency)
    if path.endswith("/chat/completions"):
        last = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        content = _scripted(body["messages"], body.get("seed")) if model == "scripted" else f"echo: {last}"
        if model == "grader":  # a single-answer judge: a deterministic 1-10 grade from the prompt's length
            content = f"Rating: {len(last) % 10 + 1}\nGraded by length."
        if model == "always-a":  # a judge with nothing but position bias
            content = "Verdict: A\nIt is better."
        if model == "prefers-heads":  # a judge with a content preference: the answer that says Heads
            a_part = last.split("[Answer A]")[-1].split("[End of answer A]")[0]
            b_part = last.split("[Answer B]")[-1].split("[End of answer B]")[0]
            content = "Verdict: " + ("A" if "Heads" in a_part and "Heads" not in b_part else
                                     "B" if "Heads" in b_part and "Heads" not in a_part else "tie")
        # A user turn containing "RAMBLE" plays an answer cut at the token limit.
        finish = "length" if "RAMBLE" in last else "stop"
        if "COIN" in last and model == "scripted":  # seed-dependent: sampled answers differ, half end their turn
            seed = int(body.get("seed") or 0)
            content, finish = (f"Heads, short {seed}.", "stop") if seed % 2 else (f"Tails, rambling {seed} " * 4, "length")
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
    else:
        text = _scripted_completion(body["prompt"], body.get("seed")) if model == "scripted" else f"echo: {body['prompt']}"
        choice = {"index": 0, "text": text, "finish_reason": "length"}
    STATE["successes"][_key(body)] += 1
    return _response(200, {"id": "x", "object": "chat.completion", "model": model, "choices": [choice],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args, rng) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "GET" and path == "/stats":
                out = _response(200, {"successes": dict(STATE["successes"]), "attempts": STATE["attempts"],
                                      "failures": dict(STATE["failures"]), "batches_created": STATE["batches_created"]})
            elif path.startswith(("/v1/files", "/v1/batches")):
                out = await _batch_api(method, path, headers, raw, args, rng)
            else:
                out = await _answer(json.loads(raw or b"{}"), path, args, rng)
            if out is None:  # drop the connection without answering
                writer.transport.abort()
                return
            writer.write(out)
            await writer.drain()
    finally:
        writer.close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--fail-latency", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-delay", type=float, default=0.0)
    p.add_argument("--batch-cut-row", type=int, default=None, help="cut this output row of every batch in half")
    args = p.parse_args()
    rng = random.Random(args.seed)
    server = await asyncio.start_server(lambda r, w: _handle(r, w, args, rng), "127.0.0.1", 0, backlog=256)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
