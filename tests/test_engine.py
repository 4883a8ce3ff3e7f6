"""Engine tests on tiny random models (LLaMA and Gemma-3 with sliding layers) and one slow gemma-3-270m check."""

from __future__ import annotations

import pytest
import torch

from protege.engine import Completion, Engine, SamplingParams
from protege.engine.text import TextTracker

PROMPTS = [
    "Hello there, the quick brown fox",
    "Two",
    "SELECT name FROM users WHERE age > 30; def add(a, b): return a + b and then some more",
]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spin-waiting
    # makes them up to 100x slower; restore the setting so other tests are unaffected.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(params=["llama", "gemma"])
def tiny(request, tiny_llama, tiny_gemma):
    return tiny_llama if request.param == "llama" else tiny_gemma


def test_greedy_matches_hf_generate(tiny):
    # Prompts of 1..~30 tokens in one batch; 40 new tokens crosses the tiny Gemma's 16-token sliding window.
    model, tok = tiny
    prompts = _ids(tok, PROMPTS)
    outs = Engine(model, tok).generate(prompts, SamplingParams(max_new_tokens=40, stop_token_ids=[]))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(model, prompt, 40)
        assert (out.prompt_tokens, out.completion_tokens, out.finish_reason) == (len(prompt), 40, "length")
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_kv_cache_goes_by_the_name_transformers_takes(tiny):
    # transformers 5.x renamed the forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40).
    import warnings

    model, tok = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = Engine(model, tok).generate(_ids(tok, PROMPTS[:1]), SamplingParams(max_new_tokens=3, stop_token_ids=[]))
    assert out[0].completion_tokens == 3


def test_more_prompts_than_rows_and_prefill_budget(tiny_gemma):
    model, tok = tiny_gemma
    prompts = _ids(tok, PROMPTS * 3)
    params = SamplingParams(max_new_tokens=12, stop_token_ids=[])
    wide = Engine(model, tok).generate(prompts, params)
    narrow = Engine(model, tok, max_batch_size=2, prefill_tokens=8).generate(prompts, params)
    assert [o.token_ids for o in narrow] == [o.token_ids for o in wide]


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    model, tok = tiny
    prompts = _ids(tok, PROMPTS)
    sp = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7, stop_token_ids=[])
    alone = Engine(model, tok).generate([prompts[0]], sp)[0]
    others = [SamplingParams(max_new_tokens=n, temperature=1.3, seed=s, stop_token_ids=[]) for n, s in [(5, 1), (30, 2)]]
    batched = Engine(model, tok).generate([prompts[1], prompts[0], prompts[2]], [others[0], sp, others[1]])
    assert batched[1].token_ids == alone.token_ids
    other_seed = Engine(model, tok).generate([prompts[0]], SamplingParams(**{**sp.__dict__, "seed": 8}))[0]
    assert other_seed.token_ids != alone.token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_llama):
    model, tok = tiny_llama
    prompts = _ids(tok, PROMPTS)
    eng = Engine(model, tok)
    greedy = eng.generate(prompts, SamplingParams(max_new_tokens=10, stop_token_ids=[]))
    for sp in (SamplingParams(max_new_tokens=10, temperature=2.0, top_k=1, seed=0, stop_token_ids=[]),
               SamplingParams(max_new_tokens=10, temperature=0.5, top_p=1e-6, seed=0, stop_token_ids=[])):
        assert [o.token_ids for o in eng.generate(prompts, sp)] == [o.token_ids for o in greedy]


def test_stop_token_ids(tiny_llama):
    model, tok = tiny_llama
    eng = Engine(model, tok)
    prompt = _ids(tok, PROMPTS[:1])
    full = eng.generate(prompt, SamplingParams(max_new_tokens=30, stop_token_ids=[]))[0].token_ids
    stop_id = full[6]
    cut = full.index(stop_id)
    out = eng.generate(prompt, SamplingParams(max_new_tokens=30, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == full[: cut + 1] and out.finish_reason == "stop"  # the stop id is kept in the ids
    assert out.text == tok.decode(full[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_default_stop_ids_come_from_the_chat_format(tiny_llama):
    model, tok = tiny_llama
    eng = Engine(model, tok)
    assert tok.eos_token_id in eng.chat_format.stop_token_ids
    out = eng.chat([[{"role": "user", "content": "Name the capital of France."}]], SamplingParams(max_new_tokens=5))[0]
    assert isinstance(out, Completion)
    assert out.prompt_tokens == len(eng.chat_format.encode_prompt([{"role": "user", "content": "Name the capital of France."}]))
    assert out.finish_reason in ("stop", "length") and out.completion_tokens <= 5


def test_stop_string_is_cut_and_never_streamed(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    prompt = _ids(tok, PROMPTS[:1])[0]
    full = eng.generate([prompt], SamplingParams(max_new_tokens=30, stop_token_ids=[]))[0].text
    stop = full[10:14]
    assert stop.strip() and "\ufffd" not in stop
    params = SamplingParams(max_new_tokens=30, stop=[stop], stop_token_ids=[])
    out = eng.generate([prompt], params)[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]
    deltas = list(eng.stream(prompt, params))
    assert "".join(deltas) == out.text
    assert not eng.has_pending()


def test_stream_deltas_join_to_the_text(tiny_gemma):
    model, tok = tiny_gemma
    eng = Engine(model, tok)
    prompt = _ids(tok, PROMPTS[2:])[0]
    params = SamplingParams(max_new_tokens=25, stop_token_ids=[])
    deltas = list(eng.stream(prompt, params))
    assert "".join(deltas) == eng.generate([prompt], params)[0].text


def test_text_tracker_utf8_and_split_stop_string(tiny_llama):
    _, tok = tiny_llama
    text = "héllo 世界 🎉 and STOP here"
    ids = tok(text)["input_ids"]
    tracker = TextTracker(tok, ["世界 🎉 and STOP"])
    deltas = []
    for i in ids:
        delta, hit = tracker.push(i)
        assert "\ufffd" not in delta  # never half a character
        deltas.append(delta)
        if hit:
            break
    assert hit and "".join(deltas) == "héllo " == tracker.text
    plain = TextTracker(tok, [])
    joined = "".join(plain.push(i)[0] for i in ids) + plain.flush()
    assert joined == text


def test_max_new_tokens_and_bad_input(tiny_llama):
    model, tok = tiny_llama
    eng = Engine(model, tok)
    prompts = _ids(tok, PROMPTS)
    outs = eng.generate(prompts, [SamplingParams(max_new_tokens=n, stop_token_ids=[]) for n in (0, 1, 7)])
    assert [o.completion_tokens for o in outs] == [0, 1, 7]
    assert all(o.finish_reason == "length" for o in outs)
    with pytest.raises(ValueError, match="at least one token"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="2 SamplingParams"):
        eng.generate(prompts, [SamplingParams()] * 2)
    with pytest.raises(ValueError, match="weights"):
        Engine(model, tok, weights="int3")


def test_continuous_batching_and_cancel(tiny):
    model, tok = tiny
    prompts = _ids(tok, PROMPTS)
    params = [SamplingParams(max_new_tokens=n, stop_token_ids=[]) for n in (15, 25, 20)]
    alone = [Engine(model, tok).generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]

    eng = Engine(model, tok, max_batch_size=2)
    got: dict[int, list[int]] = {}
    texts: dict[int, str] = {}

    def step():
        for out in eng.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text_delta
            if out.finished:
                got[out.request_id] = out.finished.token_ids
                assert texts[out.request_id] == out.finished.text

    rid0 = eng.add_request(prompts[0], params[0])
    victim = eng.add_request(prompts[2], SamplingParams(max_new_tokens=100, stop_token_ids=[]))
    for _ in range(4):
        step()
    rid1 = eng.add_request(prompts[1], params[1])  # both rows are busy: these two wait
    rid2 = eng.add_request(prompts[2], params[2])
    step()
    assert not got and len(eng._running) == 2
    eng.cancel(victim)  # frees a row at once: rid1 joins mid-way on the next step, rid2 when rid0 ends
    assert len(eng._running) == 1
    while eng.has_pending():
        step()
    assert victim not in got
    assert [got[r] for r in (rid0, rid1, rid2)] == alone


@pytest.mark.slow
def test_gemma_270m_greedy_matches_hf_generate():
    from conftest import builtin_model

    eng = Engine.from_spec(builtin_model("gemma-3-270m"))
    tok = eng.tokenizer
    prompts = _ids(tok, ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"])
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=20, stop_token_ids=[]))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(eng.model, prompt, 20)


def test_screened_head_finds_the_fp32_argmax():
    from protege.engine.head import ScreenedHead

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 20000, bias=False)
    head = ScreenedHead(lin)
    hidden = torch.randn(32, 64) * torch.linspace(0.5, 20, 64)  # a few large "outlier" dims, as in Gemma
    with torch.inference_mode():
        assert torch.equal(head.argmax(hidden), lin(hidden).argmax(-1))
        assert torch.equal(head.logits(hidden), lin(hidden))
        lin.weight.mul_(-1)  # a training update: the stale int8 copy would pick the old leaders
        head.refresh()
        assert torch.equal(head.argmax(hidden), lin(hidden).argmax(-1))


def test_smooth_int8_linear_keeps_the_product():
    from protege.engine.int8 import SmoothInt8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(8, 64)
    x[:, 3] *= 40  # an outlier channel, the case smoothing is for
    q = SmoothInt8Linear(lin, x.abs().amax(0))
    with torch.inference_mode():
        rel = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
    assert rel < 0.03


def test_int8_weights_mode(tiny_gemma):
    from tiny import tiny_model

    model, tok = tiny_model("gemma", seed=0)  # a private copy: int8 mode quantizes the Linear layers in place
    fp32_model, _ = tiny_gemma
    prompts = _ids(tok, PROMPTS)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=[])
    outs = Engine(model, tok, weights="int8").generate(prompts, params)
    ref = Engine(fp32_model, tok).generate(prompts, params)
    assert [o.completion_tokens for o in outs] == [10, 10, 10]
    from protege.engine.int8 import SmoothInt8Linear

    assert isinstance(model.model.layers[0].mlp.up_proj, SmoothInt8Linear)
    assert type(model.lm_head) is torch.nn.Linear  # the head stays fp32: it is screened, then rescored
    assert all(o.finish_reason == "length" for o in ref)
    # Random tiny models have near-tied logits, so compare logits, not greedy tokens.
    ids = torch.tensor([prompts[2]])
    with torch.inference_mode():
        a, b = model(input_ids=ids).logits, fp32_model(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 0.1
