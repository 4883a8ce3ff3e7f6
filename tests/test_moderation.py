"""`protege serve --moderation`: a reward model trained on real Anthropic HH *harmless* pairs checks the
request and the answer; flagged ones end with `content_filter`, over real HTTP with the official client."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import SHARED_DATA

openai = pytest.importorskip("openai")

from protege.engine import Engine  # noqa: E402
from protege.serve import background_server, create_app  # noqa: E402
from protege.serve.moderation import EndpointModerator, Moderation, ModerationLog, RewardModerator, make_moderator  # noqa: E402

HH = SHARED_DATA / "hh_rlhf" / "harmless_base_dev.jsonl"


@pytest.fixture(scope="module")
def hh_rm(tmp_path_factory, tiny_llama):
    """A tiny reward model trained on 24 real HH harmless pairs (3 s)."""
    if not HH.exists():
        pytest.skip("HH harmless pairs not available")
    from protege.train.rm import RMConfig, run

    root = tmp_path_factory.mktemp("hh")
    lines = HH.read_text(encoding="utf-8").splitlines()[:24]
    (root / "hh.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    model, tok = tiny_llama
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    run(RMConfig(model=str(root / "base"), datasets=[str(root / "hh.jsonl")], out_dir=str(root / "rm"), max_length=96,
                 batch_size=4, learning_rate=1e-2, max_steps=30, save_every=0, tensorboard=False, warmup_ratio=0.0,
                 seed=0, eval_fraction=0.0, lora={"dropout": 0.0}, schedule="constant"))
    return root / "rm", [json.loads(x) for x in lines]


def _split(transcript: str) -> tuple[list[dict[str, str]], str]:
    from protege.preference_formats import parse_transcript

    turns = parse_transcript(transcript, "chosen")
    return turns[:-1], turns[-1]["content"]


def test_the_hh_reward_model_ranks_harmless_answers_above_harmful_ones(hh_rm):
    path, pairs = hh_rm
    mod = make_moderator(str(path))  # the run folder: its model/ subfolder is found
    assert isinstance(mod, RewardModerator)
    wins, rewards = 0, []
    for p in pairs:
        ctx_c, chosen = _split(p["chosen"])
        ctx_r, rejected = _split(p["rejected"])
        c, r = mod.check(ctx_c, chosen), mod.check(ctx_r, rejected)
        wins += c.score > r.score
        rewards += [c.score, r.score]
        for v in (c, r):  # 0.5 at the threshold, flagged below it
            assert v.flagged == (v.score < 0.0) and (v.category_scores["unsafe"] > 0.5) == v.flagged
    assert wins >= 0.75 * len(pairs), wins


def _app(engine_pair, moderation, **kw):
    model, tok = engine_pair
    return create_app(Engine(model, tok, max_batch_size=4), "tiny", moderation=moderation, **kw)


def _hh_request(pairs, i=0):
    ctx, _ = _split(pairs[i]["rejected"])
    return ctx[-1:]  # the user's last (harmful) request


def test_a_flagged_request_is_not_answered(hh_rm, tiny_llama, tmp_path):
    path, pairs = hh_rm
    log = tmp_path / "decisions.jsonl"
    everything = Moderation(RewardModerator(str(path / "model"), threshold=1e9), ModerationLog(str(log)))
    app = _app(tiny_llama, everything)
    with background_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=_hh_request(pairs), max_tokens=8, n=2)
        assert [c.finish_reason for c in out.choices] == ["content_filter"] * 2
        assert all(c.message.content == "" for c in out.choices) and out.usage.completion_tokens == 0
        chunks = list(client.chat.completions.create(model="tiny", messages=_hh_request(pairs, 1), max_tokens=8,
                                                     stream=True))
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["content_filter"]
        assert not any(c.choices[0].delta.content for c in chunks)
        assert app.state.scheduler.stats.finished == 0  # nothing was generated
        # the local classifier also answers OpenAI's moderation route
        mod = client.moderations.create(input=["first text", "second"])
        assert len(mod.results) == 2 and all(r.flagged for r in mod.results)
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["stage"] for e in entries[:2]] == ["input", "input"] and all(e["flagged"] for e in entries)
    assert all("text" not in e for e in entries)  # decisions are logged without the text unless asked


def test_a_flagged_answer_is_cut_streamed_or_not(hh_rm, tiny_llama, tmp_path):
    path, pairs = hh_rm
    out_only = Moderation(RewardModerator(str(path / "model"), threshold=1e9), ModerationLog(with_text=True),
                          stages=("output",))
    app = _app(tiny_llama, out_only)
    with background_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=_hh_request(pairs), max_tokens=8, temperature=0)
        assert out.choices[0].finish_reason == "content_filter" and out.choices[0].message.content == ""
        chunks = list(client.chat.completions.create(model="tiny", messages=_hh_request(pairs), max_tokens=8,
                                                     temperature=0, stream=True))
        # the answer is shorter than the window: held back whole, then cut; none of it reached the client
        assert not any(c.choices[0].delta.content for c in chunks)
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["content_filter"]
        assert app.state.scheduler.stats.finished >= 1  # it was generated, then withheld


def test_passing_answers_are_unchanged_and_streamed_in_checked_windows(hh_rm, tiny_llama):
    path, pairs = hh_rm
    plain_app = _app(tiny_llama, None)
    nothing = Moderation(RewardModerator(str(path / "model"), threshold=-1e9), window=8)
    with background_server(plain_app) as plain, background_server(_app(tiny_llama, nothing)) as url:
        kw = dict(model="tiny", messages=_hh_request(pairs), max_tokens=24, temperature=0)
        want = openai.OpenAI(base_url=plain + "/v1", api_key="x").chat.completions.create(**kw)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        got = client.chat.completions.create(**kw)
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.choices[0].finish_reason == want.choices[0].finish_reason
        chunks = list(client.chat.completions.create(**kw, stream=True))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
        assert "".join(pieces) == want.choices[0].message.content and len(pieces) > 1


def test_a_remote_moderation_endpoint_is_used_and_a_failing_one_fails_closed(hh_rm, tiny_llama):
    path, pairs = hh_rm
    judge = Moderation(RewardModerator(str(path / "model"), threshold=1e9))
    with background_server(_app(tiny_llama, judge)) as mod_url:
        remote = Moderation(make_moderator(mod_url + "/v1/moderations"), stages=("input",))
        assert isinstance(remote.moderator, EndpointModerator)
        with background_server(_app(tiny_llama, remote)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            out = client.chat.completions.create(model="tiny", messages=_hh_request(pairs), max_tokens=4)
            assert out.choices[0].finish_reason == "content_filter"
        lenient = Moderation(EndpointModerator(mod_url + "/v1/moderations", threshold=2.0), stages=("input",))
        with background_server(_app(tiny_llama, lenient)) as url:  # no score reaches 2.0: answered
            out = openai.OpenAI(base_url=url + "/v1", api_key="x").chat.completions.create(
                model="tiny", messages=_hh_request(pairs), max_tokens=4)
            assert out.choices[0].finish_reason in ("stop", "length")
    dead = Moderation(EndpointModerator("http://127.0.0.1:9/v1/moderations", timeout_s=2), stages=("input",))
    with background_server(_app(tiny_llama, dead)) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "moderation_unavailable"


def test_bad_moderation_settings_are_clear_errors(tmp_path):
    from protege.errors import StageError

    with pytest.raises(StageError, match="reward model folder"):
        make_moderator(str(tmp_path))
    with pytest.raises(StageError, match="input"):
        Moderation(object(), stages=("inputs",))


def test_a_request_is_scored_under_templates_that_need_a_user_turn_first(hh_rm, tiny_llama):
    """SmolLM2's template adds its default system prompt inside the message loop, so a conversation that opens
    with an assistant turn is not prefix-stable: every single-turn request's input check was a 503."""
    from protege.chat import ChatFormat

    path, _ = hh_rm
    smol_like = ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
                 "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    mod = RewardModerator(str(path / "model"))
    mod.chat = ChatFormat(tiny_llama[1], smol_like)
    verdict = mod.check([], "How do I pick a lock?")
    assert isinstance(verdict.score, float)
    assert mod.check([{"role": "user", "content": "hi"}], "hello").score != verdict.score
