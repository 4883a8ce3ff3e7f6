"""`protege serve` over a real uvicorn server on 127.0.0.1, driven by the official `openai` client.

The tiny random LLaMA stands in for a real model: its greedy text is arbitrary but deterministic, so
"the server returns exactly what the engine returns" is a sharp check.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from protege.engine import Engine, SamplingParams  # noqa: E402
from protege.serve import background_server, create_app  # noqa: E402

PROMPTS = [f"Question {i}: what is {i} plus {i + 1}?" for i in range(32)]


class PacedEngine(Engine):
    """The real engine, slowed to one decode step per `delay` seconds so a test can act mid-reply."""

    delay = 0.02

    def step(self):  # type: ignore[override]
        time.sleep(self.delay)
        return super().step()


def reference(model, tok, messages, **kw):
    """What the engine itself answers (a separate Engine: the server's one lives on its own thread)."""
    eng = Engine(model, tok)
    ids = eng.chat_format.encode_prompt(messages)
    return eng.generate([ids], SamplingParams(**kw))[0], len(ids)


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def server(tiny_llama):
    model, tok = tiny_llama
    app = create_app(Engine(model, tok, max_batch_size=32), "tiny-llama", max_batch=32)
    with background_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_non_streaming_equals_engine_greedy(client, tiny_llama):
    expected, n_prompt = reference(*tiny_llama, user("Name the capital of France."), max_new_tokens=24)
    out = client.chat.completions.create(model="tiny-llama", messages=user("Name the capital of France."),
                                         temperature=0, max_tokens=24)
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.completion_tokens == expected.completion_tokens
    assert out.usage.total_tokens == n_prompt + expected.completion_tokens
    assert out.model == "tiny-llama" and out.object == "chat.completion"


def test_streaming_equals_engine_greedy_with_usage(client, tiny_llama):
    messages = [{"role": "system", "content": "Be brief."}] + user("Write a short poem about the sea.")
    expected, n_prompt = reference(*tiny_llama, messages, max_new_tokens=30)
    stream = client.chat.completions.create(model="tiny-llama", messages=messages, temperature=0,
                                            max_completion_tokens=30, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == n_prompt
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it really streamed


def test_sse_wire_format_ends_with_done(server):
    body = {"messages": user("hi"), "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_streaming_n_choices_are_indexed(client):
    stream = client.chat.completions.create(model="tiny-llama", messages=user("hi"), temperature=0, max_tokens=6, n=2,
                                            stream=True)
    texts, finished = ["", ""], set()
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1} and texts[0] == texts[1] and texts[0]  # greedy: both choices agree


def test_stop_string_n_and_seed(client, tiny_llama):
    greedy, _ = reference(*tiny_llama, user("hello"), max_new_tokens=20)
    assert len(greedy.text) > 5  # the seeded tiny model says something to cut
    piece = greedy.text[3:5]  # stop on a piece of the greedy answer: the reply is cut before it
    out = client.chat.completions.create(model="tiny-llama", messages=user("hello"), temperature=0, max_tokens=20,
                                         stop=piece)
    assert out.choices[0].message.content == greedy.text.split(piece, 1)[0]
    assert out.choices[0].finish_reason == "stop"
    kw = dict(model="tiny-llama", messages=user("hello"), temperature=1.0, max_tokens=12, n=3, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-llama"


def test_32_concurrent_streaming_clients(server, tiny_llama):
    url, app = server
    expected = {p: reference(*tiny_llama, user(p), max_new_tokens=16)[0].text for p in PROMPTS}

    async def one(aclient, prompt):
        stream = await aclient.chat.completions.create(model="tiny-llama", messages=user(prompt), temperature=0,
                                                       max_tokens=16, stream=True)
        return prompt, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                     http_client=openai.DefaultAsyncHttpxClient(
                                         limits=httpx.Limits(max_connections=64)))
        try:
            return await asyncio.gather(*(one(aclient, p) for p in PROMPTS))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert len(results) == 32
    assert {p: text for p, text in results} == expected
    assert app.state.scheduler.stats.max_active_seen > 1  # requests really shared decode steps


@pytest.mark.parametrize("body, status, needle, param", [
    (b"{not json", 400, "JSON", None),
    (b"[1, 2]", 400, "JSON object", None),
    ({"messages": []}, 400, "messages is empty", "messages"),
    ({}, 400, "messages", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "'wizard'", "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, 400, "role", "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens is 0", "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens is 1000000",
     "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, 400, "expected 1..",
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi " * 2000}]}, 400, "context", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature", "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p", "top_p"),
    # the sampling bounds are config.Temperature/TopP/TopK, the types every stage config declares
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": -1}, 400, "greater than or equal to 0 (got -1)",
     "top_k"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature", "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, 400, "less than or equal to 2 (got 2.5)",
     "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n is 0", "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature", "temperature"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "assistant", "messages"),
    # no lax coercion (issue 31): a string is not a number, "yes" is not a boolean
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "3"}, 400, "valid integer", "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "valid boolean", "stream"),
])
def test_bad_requests_get_openai_error_shape(server, body, status, needle, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server[0] + "/v1/chat/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_openai_client_raises_bad_request_with_message(client):
    with pytest.raises(openai.BadRequestError, match="expected one of system, user, assistant"):
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny-llama", messages=user("word " * 3000))


def test_unknown_route_is_openai_shaped_404(server):
    r = httpx.get(server[0] + "/v1/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_api_key_required_when_configured(tiny_llama):
    app = create_app(Engine(*tiny_llama), "tiny", api_key="s3cret")
    with background_server(app) as url:
        body = {"messages": user("hi"), "max_tokens": 3}
        missing = httpx.post(url + "/v1/chat/completions", json=body)
        wrong = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert missing.status_code == wrong.status_code == 401
        assert "missing API key" in missing.json()["error"]["message"]
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # liveness stays open
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0).chat.completions.create(
            model="tiny", messages=user("hi"), max_tokens=3)
        assert ok.usage.completion_tokens >= 1


def test_disconnect_mid_stream_frees_the_slot(tiny_llama):
    model, tok = tiny_llama
    engine = PacedEngine(model, tok)
    app = create_app(engine, "tiny", max_batch=1)  # one slot: a leaked request would block the next one
    scheduler = app.state.scheduler
    body = {"messages": user("Tell me a long story."), "max_tokens": 400, "temperature": 1.0, "seed": 1,
            "stream": True}
    with background_server(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"content": ""' not in line:
                    break  # first real token arrived; leave mid-reply
            assert scheduler.stats.active == 1
        deadline = time.monotonic() + 10
        while (scheduler.stats.active or scheduler.stats.cancelled < 1) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.stats.cancelled == 1 and scheduler.stats.active == 0
        assert scheduler.stats.finished == 0  # it was cut, not run to its 400 tokens
        assert not engine.has_pending()
        # The freed slot serves the next client (with max_batch=1 it would otherwise queue behind it).
        r = httpx.post(url + "/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and scheduler.stats.finished == 1


def test_page_and_assets_are_served_with_a_strict_csp(server):
    page = httpx.get(server[0] + "/")
    assert page.status_code == 200 and "<title>protege chat</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "markdown.js", "style.css"):
        assert httpx.get(f"{server[0]}/web/{asset}").status_code == 200


def test_protege_serve_cli_binds_loopback_with_api_key(tiny_llama_dir):
    import os
    import subprocess
    import sys

    from protege.serve import free_port

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TEST_SERVE_KEY="k3y")
    proc = subprocess.Popen([sys.executable, "-m", "protege.cli", "serve", str(tiny_llama_dir), "--port", str(port),
                             "--api-key-env", "TEST_SERVE_KEY", "--max-batch", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        banner = ""
        while "serving" not in banner and proc.poll() is None:
            banner = proc.stdout.readline()  # skip weight-loading progress lines
        assert f"http://127.0.0.1:{port}" in banner and "API key required" in banner
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        c = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        assert c.models.list().data[0].id == tiny_llama_dir.name
    finally:
        proc.terminate()
        proc.wait(30)


def test_protege_serve_cli_refuses_an_unset_key_variable(tiny_llama_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "protege.cli", "serve", str(tiny_llama_dir), "--api-key-env",
                           "PROTEGE_TEST_UNSET_VAR"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "PROTEGE_TEST_UNSET_VAR" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unknown_model_name_is_a_404_unless_served_under_it(client, tiny_llama):
    """Issue 31: any `model` got a 200; OpenAI and vLLM answer 404 model_not_found."""
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist") as err:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=2)
    assert err.value.code == "model_not_found"
    app = create_app(Engine(*tiny_llama), "tiny", model_aliases=("gpt-4o",))
    with background_server(app) as url:
        aliased = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert aliased.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=2).choices
        assert [m.id for m in aliased.models.list().data] == ["tiny", "gpt-4o"]
        with pytest.raises(openai.NotFoundError):
            aliased.chat.completions.create(model="other", messages=user("hi"), max_tokens=2)
    with background_server(create_app(Engine(*tiny_llama), "tiny", model_aliases=("*",))) as url:
        anyname = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert anyname.chat.completions.create(model="whatever", messages=user("hi"), max_tokens=2).choices


def test_an_unstreamed_client_that_hangs_up_frees_its_slot_while_tokens_flow(tiny_llama):
    """Issue 31: disconnects were only noticed after 1 s without a token, so a client that hung up mid-answer
    kept its slot until the answer (or the 600 s timeout) was done."""
    model, tok = tiny_llama
    app = create_app(PacedEngine(model, tok), "tiny", max_batch=1)
    scheduler = app.state.scheduler
    # greedy: the tiny model runs to the 400-token limit (8 s at one step per 20 ms)
    body = {"messages": user("Tell me a long story."), "max_tokens": 400, "temperature": 0}
    with background_server(app) as url:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s: ~50 of 400 steps done
            httpx.post(url + "/v1/chat/completions", json=body, timeout=1.0)
        deadline = time.monotonic() + 3
        while scheduler.stats.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.stats.cancelled == 1 and scheduler.stats.active == 0 and scheduler.stats.finished == 0


def _teacher_forced_logprobs(model, prompt_ids, answer_ids):
    """log p(answer token | everything before it) from one plain forward over prompt + answer."""
    import torch

    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return lp[len(prompt_ids) - 1:-1]


def test_logprobs_are_the_models_own_and_match_streamed_ones(client, tiny_llama):
    """Issue 31 MED: logprobs/top_logprobs were refused; now each answer token carries the model's
    log-probability (equal to a plain forward's), its bytes, and the top alternatives, streamed or not."""
    model, tok = tiny_llama
    msgs = user("Spell a long word.")
    out = client.chat.completions.create(model="tiny-llama", messages=msgs, temperature=0, max_tokens=12,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    expected, _ = reference(model, tok, msgs, max_new_tokens=12)
    text_ids = [t for t in expected.token_ids if t not in tok.all_special_ids]
    assert len(content) == len(text_ids) > 0
    # a random model emits stray UTF-8 continuation bytes: the text shows U+FFFD, the bytes stay exact
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace") == out.choices[0].message.content
    prompt_ids = Engine(model, tok).chat_format.encode_prompt(msgs)
    ref = _teacher_forced_logprobs(model, prompt_ids, expected.token_ids)
    for pos, (c, t) in enumerate(zip(content, text_ids)):
        assert abs(c.logprob - float(ref[pos, t])) < 1e-4
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)  # greedy
        assert [x.logprob for x in c.top_logprobs] == sorted((x.logprob for x in c.top_logprobs), reverse=True)
    # sampled: the log-probabilities are the model's own (before temperature), whatever the temperature
    hot = client.chat.completions.create(model="tiny-llama", messages=msgs, temperature=1.5, seed=3, max_tokens=8,
                                         logprobs=True)
    stream = client.chat.completions.create(model="tiny-llama", messages=msgs, temperature=1.5, seed=3, max_tokens=8,
                                            logprobs=True, stream=True)
    streamed = [c for ch in stream if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == \
        [(c.token, round(c.logprob, 5)) for c in hot.choices[0].logprobs.content]
    assert all(c.top_logprobs == [] for c in streamed)
    plain = client.chat.completions.create(model="tiny-llama", messages=msgs, temperature=0, max_tokens=12)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content


def test_a_koala_model_is_served_and_answers_with_its_positive_marker(tmp_path, tiny_llama_dir):
    """Issue 30 (marker round trip): curate's tag step writes the markers into its manifest, SFT records the
    positive one beside the model it saves, and `serve` (and every ChatFormat user: eval answer, chat, local
    teachers) puts it into the prompt, as Koala's demo did."""
    from protege.chat import ChatFormat
    from protege.curate import CurateConfig
    from protege.curate import run as curate
    from protege.models import load
    from protege.train.sft import SFTConfig
    from protege.train.sft import run as sft

    rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i} about rivers"}],
             "chosen": {"role": "assistant", "content": f"a good answer {i}"},
             "rejected": {"role": "assistant", "content": f"a bad answer {i}"}} for i in range(8)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curate(CurateConfig(inputs=[str(tmp_path / "prefs.jsonl")], out_dir=str(tmp_path / "koala"),
                        steps=[{"step": "tag", "positive": "<|good|>", "placement": "user_suffix"}]))
    sft(SFTConfig(model=str(tiny_llama_dir), datasets=[str(tmp_path / "koala" / "records.jsonl")],
                  out_dir=str(tmp_path / "sft"), max_length=64, batch_size=4, max_steps=2, save_every=0,
                  tensorboard=False, warmup_ratio=0.0, save_merged=True))
    merged = tmp_path / "sft" / "merged"
    assert json.loads((merged / "protege_chat.json").read_text())["marker"] == {"positive": "<|good|>",
                                                                                  "placement": "user_suffix"}
    assert json.loads((tmp_path / "sft" / "manifest.json").read_text())["marker"]["positive"] == "<|good|>"
    model, tok = load(str(merged))
    fmt = ChatFormat.from_tokenizer(tok)
    msgs = user("question 3 about rivers")
    marked = fmt.encode_prompt(msgs)
    assert fmt.encode_prompt([{"role": "user", "content": "question 3 about rivers\n\n<|good|>"}]) == marked
    fmt.marker = None
    plain = fmt.encode_prompt(msgs)
    assert len(marked) > len(plain)
    with background_server(create_app(Engine(model, tok), "koala")) as url:
        out = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="koala", messages=msgs, max_tokens=2, temperature=0)
    assert out.usage.prompt_tokens == len(marked)  # the server fed the marked prompt


def test_response_format_json_modes_give_valid_json_streamed_or_not(client, server):
    """Issue 31 MED: `response_format: json_object` was refused (400); it is now enforced by xgrammar's token
    masks (as vLLM does), like OpenAI's `json_schema` with a schema; even a random model answers valid JSON."""
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "ok": {"type": "boolean"}},
              "required": ["city", "ok"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    out = client.chat.completions.create(model="tiny-llama", messages=user("Capital of France, as JSON."),
                                         temperature=0, max_tokens=40, response_format=fmt)
    data = json.loads(out.choices[0].message.content)
    assert out.choices[0].finish_reason == "stop" and set(data) == {"city", "ok"} and data["city"] in ("Paris", "Rome")
    stream = client.chat.completions.create(model="tiny-llama", messages=user("Capital of Italy, as JSON."),
                                            temperature=1.0, seed=4, max_tokens=40, response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert set(json.loads(text)) == {"city", "ok"}
    anything = client.chat.completions.create(model="tiny-llama", messages=user("Any JSON object."), temperature=0,
                                              max_tokens=24, response_format={"type": "json_object"})
    body = anything.choices[0].message.content
    assert body.startswith("{")  # an object is begun; a random model may run out of tokens before closing it
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(body), dict)
    with pytest.raises(openai.BadRequestError, match="schema"):
        client.chat.completions.create(model="tiny-llama", messages=user("x"), max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})
