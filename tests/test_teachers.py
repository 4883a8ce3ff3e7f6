"""Teacher backends against a real loopback OpenAI-format server, and the local engine on a tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from protege.config import ConfigError, load_config
from protege.engine import SamplingParams
from protege.teachers import TeacherConfig, TeacherError, make_teacher
from protege.teachers.openai_api import _retry_after

from fake_openai_server import FakeServer

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture()
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture()
def flaky_server():
    s = FakeServer("--fail-rate", "0.2", "--latency", "0.1", "--seed", "1")
    yield s
    s.close()


def _convs(n: int, tag: str = "q") -> list[list[dict]]:
    return [[{"role": "user", "content": f"{tag} {i}"}] for i in range(n)]


def _cfg(url: str, **kw) -> TeacherConfig:
    base = dict(backend="openai", model="fake", base_url=url, backoff_base=0.01, backoff_max=0.05, max_retries=10)
    base.update(kw)
    return TeacherConfig(**base)


def test_flaky_server_every_request_answered_exactly_once_near_ideal_time(flaky_server):
    """The issue's check: 20% of requests fail (429 / 500 / dropped), 100 ms latency, concurrency 16.

    Each of the 320 distinct requests gets exactly one successful completion server-side, and the wall
    time stays within 1.5x of requests x latency / concurrency. Failures answer at once, as a rate
    limiter does; 320 requests amortise the client's start-up (~0.2 s). The machine is shared, so the timing
    gets up to three tries (each with fresh prompts); correctness is asserted on every try.
    """
    n, latency, conc = 320, 0.1, 16
    ideal = n * latency / conc
    walls = []
    for attempt in range(3):
        teacher = make_teacher(_cfg(flaky_server.url, concurrency=conc))
        convs = _convs(n, tag=f"try{attempt}")
        t0 = time.perf_counter()
        out = teacher.complete(convs, SamplingParams(max_new_tokens=8))
        walls.append(time.perf_counter() - t0)
        assert [r.text for r in out] == [f"echo: try{attempt} {i}" for i in range(n)]
        assert teacher.stats["sent"] == n and teacher.stats["retries"] > 0
        if walls[-1] <= 1.5 * ideal:
            break
    stats = flaky_server.stats()
    assert sum(stats["failures"].values()) > 0
    assert all(count == 1 for count in stats["successes"].values())
    assert len(stats["successes"]) == n * len(walls)
    print(f"wall {min(walls):.2f}s vs ideal {ideal:.2f}s (tries: {[round(w, 2) for w in walls]})")
    load = os.getloadavg()[0]
    if min(walls) > 1.5 * ideal and load > 2 * (os.cpu_count() or 1):
        # Client and server are CPU-starved, not waiting on each other: the bound is not measurable now.
        pytest.skip(f"machine overloaded (load {load:.1f} on {os.cpu_count()} cores): best wall {min(walls):.2f}s "
                    f"vs ideal {ideal:.2f}s; correctness was checked")
    assert min(walls) <= 1.5 * ideal


def test_cache_answers_rerun_without_requests(server, tmp_path):
    teacher = make_teacher(_cfg(server.url), cache_dir=tmp_path)
    first = teacher.complete(_convs(12), SamplingParams(max_new_tokens=8))
    attempts = server.stats()["attempts"]
    teacher.close()
    again = make_teacher(_cfg(server.url), cache_dir=tmp_path)
    second = again.complete(_convs(12), SamplingParams(max_new_tokens=8))
    assert [r.text for r in second] == [r.text for r in first]
    assert all(r.cached for r in second) and again.stats["cache_hits"] == 12 and again.stats["sent"] == 0
    assert server.stats()["attempts"] == attempts
    # A different sampling setting is a different request.
    again.complete(_convs(1), SamplingParams(max_new_tokens=9))
    assert again.stats["sent"] == 1


def test_identical_requests_in_one_batch_are_sent_once(server):
    teacher = make_teacher(_cfg(server.url))
    out = teacher.complete(_convs(3) + _convs(3), SamplingParams(max_new_tokens=8))
    assert [r.text for r in out[:3]] == [r.text for r in out[3:]]
    assert teacher.stats["sent"] == 3 and server.stats()["attempts"] == 3


def test_hard_error_stops_with_clear_message_and_never_leaks_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TEACHER_API_KEY", "sk-secret-123")
    cfg = _cfg(server.url, model="hard-401", api_key_env="FAKE_TEACHER_API_KEY")
    teacher = make_teacher(cfg, cache_dir=tmp_path)
    with pytest.raises(TeacherError) as err:
        teacher.complete(_convs(4), SamplingParams(max_new_tokens=8))
    msg = str(err.value)
    assert "HTTP 401" in msg and "api_key_env" in msg and "Incorrect API key" in msg
    assert "sk-secret" not in msg and "sk-secret" not in teacher.name
    assert server.stats()["attempts"] <= 4  # no retries on a hard error
    teacher.close()
    for f in tmp_path.iterdir():
        assert b"sk-secret" not in f.read_bytes()


def test_retries_exhausted_and_timeouts_are_reported(server):
    s = FakeServer("--fail-rate", "1.0")
    try:
        with pytest.raises(TeacherError, match="gave up after 3 attempts"):
            make_teacher(_cfg(s.url, max_retries=2)).complete(_convs(1), SamplingParams(max_new_tokens=8))
    finally:
        s.close()
    with pytest.raises(TeacherError, match="ReadTimeout"):
        make_teacher(_cfg(server.url, model="slow", timeout=0.2, max_retries=1)).complete(
            _convs(1), SamplingParams(max_new_tokens=8))


def test_bad_base_url_and_refused_connection():
    with pytest.raises(TeacherError, match="bad base_url"):
        make_teacher(_cfg("localhost:1/v1")).complete(_convs(1), SamplingParams(max_new_tokens=8))
    with pytest.raises(TeacherError, match="ConnectError"):
        make_teacher(_cfg("http://127.0.0.1:9/v1", max_retries=1)).complete(_convs(1), SamplingParams(max_new_tokens=8))


def test_completion_endpoint_and_running_event_loop(server):
    teacher = make_teacher(_cfg(server.url))
    out = teacher.complete_prompts(["Task 1: add", "Task 1: sub"], SamplingParams(max_new_tokens=8))
    assert [r.text for r in out] == ["echo: Task 1: add", "echo: Task 1: sub"]
    assert out[0].finish_reason == "length" and out[0].usage == {"prompt_tokens": 3, "completion_tokens": 2}

    async def inside_loop():  # e.g. called from an async server: must not need the caller's loop
        return teacher.complete(_convs(2, "loop"), SamplingParams(max_new_tokens=8))

    assert [r.text for r in asyncio.run(inside_loop())] == ["echo: loop 0", "echo: loop 1"]


def test_retry_after_parsing():
    assert _retry_after(httpx.Response(429, headers={"Retry-After": "2"})) == 2.0
    assert _retry_after(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    assert _retry_after(httpx.Response(429)) is None
    date = "Wed, 21 Oct 2015 07:28:00 GMT"  # in the past: wait 0
    assert _retry_after(httpx.Response(503, headers={"Retry-After": date})) == 0.0


def test_config_is_strict_and_name_has_no_key(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="did you mean `concurrency`"):
        load_config(TeacherConfig, overrides={"concurency": 3})
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-abc")
    t = make_teacher(TeacherConfig(backend="openai", model="m", base_url="http://h:1/v1"))
    assert t.name == "openai:m@http://h:1/v1"


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {src!r})
    from protege.engine import SamplingParams
    from protege.teachers import TeacherConfig, make_teacher
    cfg = TeacherConfig(backend="openai", model="fake", base_url={url!r}, concurrency=4)
    convs = [[{{"role": "user", "content": f"k {{i}}"}}] for i in range(48)]
    make_teacher(cfg, cache_dir={cache!r}).complete(convs, SamplingParams(max_new_tokens=8))
""")


def test_kill9_midway_then_rerun_sends_no_finished_request_again(tmp_path):
    s = FakeServer("--latency", "0.1")
    try:
        script = _KILL_SCRIPT.format(src=str(SRC), url=s.url, cache=str(tmp_path))
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.time() + 60
        while time.time() < deadline and sum(s.stats()["successes"].values()) < 16:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = s.stats()["successes"]
        assert 16 <= len(before) < 48
        teacher = make_teacher(_cfg(s.url, concurrency=4), cache_dir=tmp_path)
        out = teacher.complete(_convs(48, "k"), SamplingParams(max_new_tokens=8))
        assert [r.text for r in out] == [f"echo: k {i}" for i in range(48)]
        after = s.stats()["successes"]
        assert len(after) == 48
        repeated = sum(1 for c in after.values() if c > 1)
        # Only requests in flight at the kill (at most `concurrency`) can be sent twice.
        assert repeated <= 4
        assert teacher.stats["cache_hits"] >= len(before) - 4
        assert teacher.stats["sent"] + teacher.stats["cache_hits"] == 48
    finally:
        s.close()


def test_local_backend_on_tiny_model_caches_and_skips_model_load(tiny_llama_dir, tmp_path):
    cfg = TeacherConfig(backend="local", model=str(tiny_llama_dir), max_batch_size=2)
    teacher = make_teacher(cfg, cache_dir=tmp_path)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    convs = _convs(3)
    out = teacher.complete(convs, params)
    assert len(out) == 3 and all(r.finish_reason in ("stop", "length") for r in out)
    assert all(r.usage["completion_tokens"] <= 6 for r in out)
    raw = teacher.complete_prompts(["The quick brown"], params)
    assert raw[0].usage["prompt_tokens"] > 0
    teacher.close()
    again = make_teacher(cfg, cache_dir=tmp_path)
    assert [r.text for r in again.complete(convs, params)] == [r.text for r in out]
    assert again._engine is None  # everything came from the cache: the model was never loaded
    assert again.stats["cache_hits"] == 3


def test_a_config_cannot_name_an_arbitrary_secret_as_its_api_key(server, monkeypatch, capsys):
    """Issue 31: a recipe set `api_key_env: AWS_SECRET_ACCESS_KEY` and sent it as a Bearer token over plain http."""
    from protege.config import ConfigError, validate_dict

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-secret")
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY.*only environment variables named \\*_API_KEY"):
        validate_dict(TeacherConfig, {"backend": "openai", "api_key_env": "AWS_SECRET_ACCESS_KEY"}, "recipe.yaml")
    monkeypatch.setenv("PROTEGE_KEY_ENVS", "AWS_SECRET_ACCESS_KEY")  # the user's own choice, on their command line
    assert TeacherConfig(api_key_env="AWS_SECRET_ACCESS_KEY").api_key_env == "AWS_SECRET_ACCESS_KEY"
    monkeypatch.setenv("REMOTE_API_KEY", "sk-remote")
    teacher = make_teacher(_cfg("http://192.0.2.1:9/v1", api_key_env="REMOTE_API_KEY"))
    assert teacher._headers() == {"Authorization": "Bearer sk-remote"}
    assert "over plain http to 192.0.2.1" in capsys.readouterr().err
    make_teacher(_cfg(server.url, api_key_env="REMOTE_API_KEY"))._headers()  # loopback: no warning
    assert "plain http" not in capsys.readouterr().err


def _successes(*servers) -> dict[str, int]:
    total: dict[str, int] = {}
    for s in servers:
        for key, n in s.stats()["successes"].items():
            total[key] = total.get(key, 0) + n
    return total


def test_requests_are_spread_across_endpoints_the_faster_taking_more():
    """Issue 28 (teacher generation at scale): one teacher over several OpenAI-compatible servers (one vLLM
    per GPU); work is pulled from one queue, so each request is answered once and a slow server takes less."""
    fast, fast2, slow = FakeServer("--latency", "0.02"), FakeServer("--latency", "0.02"), FakeServer("--latency", "0.3")
    try:
        teacher = make_teacher(_cfg([fast.url, fast2.url, slow.url], concurrency=2))
        out = teacher.complete(_convs(90, "s"), SamplingParams(max_new_tokens=8))
        assert [r.text for r in out] == [f"echo: s {i}" for i in range(90)]
        per = [sum(s.stats()["successes"].values()) for s in (fast, fast2, slow)]
        assert sum(per) == 90 and min(per) > 0, per
        assert per[2] < min(per[:2]), per  # the slow server answered fewest
        assert set(_successes(fast, fast2, slow).values()) == {1}  # nothing paid for twice
        assert sum(v for k, v in teacher.stats.items() if k.startswith("endpoint:")) == 90
        assert teacher.name.startswith("openai:fake@3 endpoints")
    finally:
        for s in (fast, fast2, slow):
            s.close()


def test_a_dead_endpoint_costs_retries_not_the_run(server):
    dead = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    teacher = make_teacher(_cfg([dead, server.url], concurrency=2, max_retries=30))
    out = teacher.complete(_convs(20, "d"), SamplingParams(max_new_tokens=8))
    assert [r.text for r in out] == [f"echo: d {i}" for i in range(20)]
    assert teacher.stats[f"endpoint:{server.url}"] == 20 and teacher.stats["retries"] > 0
    with pytest.raises(ConfigError, match="twice"):
        load_config(TeacherConfig, overrides={"backend": "openai", "base_url": [server.url, server.url]})


def test_kill9_of_a_sharded_run_then_rerun_pays_for_nothing_twice(tmp_path):
    a, b = FakeServer("--latency", "0.1"), FakeServer("--latency", "0.1")
    try:
        script = _KILL_SCRIPT.replace("base_url={url!r}", "base_url={url}").format(
            src=str(SRC), url=repr([a.url, b.url]), cache=str(tmp_path))
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.time() + 60
        while time.time() < deadline and len(_successes(a, b)) < 16:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = _successes(a, b)
        assert 16 <= len(before) < 48
        teacher = make_teacher(_cfg([b.url, a.url], concurrency=4), cache_dir=tmp_path)  # order changed: same cache
        out = teacher.complete(_convs(48, "k"), SamplingParams(max_new_tokens=8))
        assert [r.text for r in out] == [f"echo: k {i}" for i in range(48)]
        after = _successes(a, b)
        assert len(after) == 48
        # only requests in flight at the kill (at most concurrency x endpoints) can have been answered twice
        assert sum(1 for c in after.values() if c > 1) <= 8
        assert teacher.stats["sent"] + teacher.stats["cache_hits"] == 48 and teacher.stats["cache_hits"] >= len(before) - 8
    finally:
        a.close()
        b.close()


def test_batch_api_answers_everything_and_the_plain_backend_reuses_its_cache(tmp_path):
    """Issue 28: hosted teachers through OpenAI's Batch API file format (upload, create, poll, read the output
    file); a request the batch fails is sent directly; the answers land in the same cache as the plain backend."""
    s = FakeServer()
    try:
        convs = _convs(12, "b") + [[{"role": "user", "content": "b 0"}]]  # a duplicate: asked once
        teacher = make_teacher(_cfg(s.url, batch=True, batch_poll_s=0.05), cache_dir=tmp_path)
        out = teacher.complete(convs, SamplingParams(max_new_tokens=8))
        assert [r.text for r in out] == [f"echo: b {i}" for i in range(12)] + ["echo: b 0"]
        stats = s.stats()
        assert stats["batches_created"] == 1 and set(stats["successes"].values()) == {1} and len(stats["successes"]) == 12
        lines = [json.loads(x) for x in next(tmp_path.glob("batch-*.jsonl")).read_text().splitlines()]
        assert len(lines) == 12 and lines[0]["url"] == "/v1/chat/completions" and lines[0]["method"] == "POST"
        assert set(lines[0]) == {"custom_id", "method", "url", "body"} and lines[0]["body"]["model"] == "fake"
        plain = make_teacher(_cfg(s.url), cache_dir=tmp_path)
        again = plain.complete(_convs(12, "b"), SamplingParams(max_new_tokens=8))
        assert all(r.cached for r in again) and s.stats()["attempts"] == stats["attempts"]
    finally:
        s.close()


def test_a_batch_output_row_that_is_not_json_is_asked_again_not_a_crash(tmp_path):
    s = FakeServer("--batch-cut-row", "3")
    try:
        teacher = make_teacher(_cfg(s.url, batch=True, batch_poll_s=0.05), cache_dir=tmp_path)
        out = teacher.complete(_convs(6, "c"), SamplingParams(max_new_tokens=8))
        assert [r.text for r in out] == [f"echo: c {i}" for i in range(6)]
        # the request of the cut row was answered twice: in the batch (row lost), then sent directly
        assert sorted(s.stats()["successes"].values()) == [1, 1, 1, 1, 1, 2]
    finally:
        s.close()


_BATCH_KILL = textwrap.dedent("""
    import sys
    sys.path.insert(0, {src!r})
    from protege.engine import SamplingParams
    from protege.teachers import TeacherConfig, make_teacher
    cfg = TeacherConfig(backend="openai", model="fake", base_url={url!r}, batch=True, batch_poll_s=0.05)
    convs = [[{{"role": "user", "content": f"k {{i}}"}}] for i in range(30)]
    make_teacher(cfg, cache_dir={cache!r}).complete(convs, SamplingParams(max_new_tokens=8))
""")


def test_a_killed_batch_run_polls_its_batch_again_instead_of_paying_twice(tmp_path):
    s = FakeServer("--batch-delay", "0.05")
    try:
        proc = subprocess.Popen([sys.executable, "-c", _BATCH_KILL.format(src=str(SRC), url=s.url, cache=str(tmp_path))])
        deadline = time.time() + 60
        while time.time() < deadline and len(s.stats()["successes"]) < 5:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert s.stats()["batches_created"] == 1
        teacher = make_teacher(_cfg(s.url, batch=True, batch_poll_s=0.05), cache_dir=tmp_path)
        out = teacher.complete(_convs(30, "k"), SamplingParams(max_new_tokens=8))
        assert [r.text for r in out] == [f"echo: k {i}" for i in range(30)]
        stats = s.stats()
        assert stats["batches_created"] == 1  # the rerun polled the batch it had paid for
        assert len(stats["successes"]) == 30 and set(stats["successes"].values()) == {1}
    finally:
        s.close()


def test_requests_a_batch_fails_are_sent_directly(tmp_path):
    s = FakeServer()
    try:
        cfg = _cfg(s.url, batch=True, batch_poll_s=0.05, model="hard-401")
        with pytest.raises(TeacherError, match="401"):  # the batch's error file, then the direct send says why
            make_teacher(cfg, cache_dir=tmp_path).complete(_convs(2, "e"), SamplingParams(max_new_tokens=4))
        assert s.stats()["batches_created"] == 1
    finally:
        s.close()


def test_the_vllm_backend_without_vllm_says_how_to_get_it(tiny_llama_dir, tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here: tests/test_vllm.py covers the backend")
    except ImportError:
        pass
    from protege.errors import StageError

    teacher = make_teacher(TeacherConfig(backend="vllm", model=str(tiny_llama_dir)), cache_dir=tmp_path)
    with pytest.raises(StageError, match="not installed.*vllm serve"):
        teacher.complete(_convs(1), SamplingParams(max_new_tokens=4))


def test_stream_gives_the_reply_complete_gives_local_and_over_http(tiny_llama_dir, tiny_llama):
    """`Teacher.stream` (what `protege chat` talks through): the pieces of a greedy reply join into the text
    `complete` gives, for a local model and for the same model behind `protege serve`; an HTTP refusal is a
    TeacherError carrying the server's message."""
    from protege.engine import Engine
    from protege.serve import background_server, create_app

    messages = [{"role": "user", "content": "hello there"}]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    local = make_teacher(TeacherConfig(model=str(tiny_llama_dir)))
    whole = local.complete([messages], params)[0].text
    pieces = list(local.stream(messages, params))
    assert len(pieces) > 1 and "".join(pieces) == whole
    with background_server(create_app(Engine(*tiny_llama), "tiny-llama")) as url:
        remote = make_teacher(_cfg(url + "/v1", model="tiny-llama"))
        assert remote.served_models() == ["tiny-llama"]
        assert "".join(remote.stream(messages, params)) == remote.complete([messages], params)[0].text
        with pytest.raises(TeacherError, match="HTTP 404: The model `nope` does not exist"):
            list(make_teacher(_cfg(url + "/v1", model="nope")).stream(messages, params))
    with pytest.raises(TeacherError, match="the model takes at most 512"):  # longer than the context
        list(local.stream([{"role": "user", "content": "word " * 600}], params))
    with pytest.raises(TeacherError, match="does not stream"):
        list(make_teacher(TeacherConfig(backend="vllm", model=str(tiny_llama_dir))).stream(messages, params))
