"""ChatFormat invariants: what training sees == what a server feeds; the mask covers exactly the answers."""

from __future__ import annotations

import pytest

from conftest import builtin_model
from protege.chat import CHATML_TEMPLATE, ChatFormat, ChatTemplateError
from protege.models import load_tokenizer
from tiny import tiny_tokenizer

CONVS = [
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "It is 5."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one, in French?"},
     {"role": "assistant", "content": "Rouge — c'est « rouge ».\n\n- with *markdown*"}],
]


def _check_invariants(fmt: ChatFormat) -> None:
    tok = fmt.tokenizer
    eot = tok.convert_ids_to_tokens(fmt.stop_token_ids[0])
    for conv in CONVS:
        enc = fmt.encode(conv)
        assert len(enc.input_ids) == len(enc.assistant_mask)
        # 1. inference prompt for every prefix == prefix of the training ids
        for i, msg in enumerate(conv):
            if msg["role"] == "assistant":
                prompt = fmt.encode_prompt(conv[:i])
                assert enc.input_ids[: len(prompt)] == prompt
                assert enc.assistant_mask[len(prompt) - 1] == 0 and enc.assistant_mask[len(prompt)] == 1
        # 2. the mask covers exactly "content + end-of-turn" of each assistant turn, nothing else
        spans, current = [], []
        for tid, m in zip(enc.input_ids, enc.assistant_mask):
            if m:
                current.append(tid)
            elif current:
                spans.append(current)
                current = []
        if current:
            spans.append(current)
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        assert len(spans) == len(answers)
        for span, answer in zip(spans, answers):
            assert span[-1] in fmt.stop_token_ids
            assert tok.decode(span[:-1]) == answer
            assert tok.convert_ids_to_tokens(span[-1]) == eot
        # 3. segment-wise tokenization == tokenizing the rendered string at once (what llama.cpp does)
        assert tok(fmt.render(conv), add_special_tokens=False)["input_ids"] == enc.input_ids


@pytest.mark.parametrize("kind, name", [("chatml", "chatml"), ("gemma", "gemma"), ("plain", "plain")])
def test_default_templates_on_tiny_tokenizer(kind, name):
    fmt = ChatFormat.from_tokenizer(tiny_tokenizer(kind))
    assert fmt.name == name
    _check_invariants(fmt)


@pytest.mark.parametrize("alias, name", [("gemma-3-270m", "gemma"), ("smollm2-135m-instruct", "tokenizer")])
def test_builtin_model_templates(alias, name):
    fmt = ChatFormat.from_tokenizer(load_tokenizer(builtin_model(alias)))
    assert fmt.name == name
    _check_invariants(fmt)


def test_generation_prompt_and_decode():
    fmt = ChatFormat.from_tokenizer(tiny_tokenizer("chatml"))
    ids = fmt.encode_prompt([{"role": "user", "content": "hi"}])
    assert fmt.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    answer = fmt.tokenizer("Hello there", add_special_tokens=False)["input_ids"] + fmt.stop_token_ids[:1]
    assert fmt.decode(answer) == "Hello there"
    with pytest.raises(ChatTemplateError, match="nothing to answer"):
        fmt.encode_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_plain_template_stop_string():
    fmt = ChatFormat.from_tokenizer(tiny_tokenizer("plain"))
    ids = fmt.tokenizer("Sure.\n### User:\nmore", add_special_tokens=False)["input_ids"]
    assert fmt.decode(ids) == "Sure."


def test_template_is_sandboxed():
    tok = tiny_tokenizer("chatml")
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}" + CHATML_TEMPLATE
    with pytest.raises(ChatTemplateError):
        ChatFormat.from_tokenizer(tok, evil).render(CONVS[0])


def test_template_raise_exception_is_a_clear_error():
    tok = tiny_tokenizer("chatml")
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + CHATML_TEMPLATE
    with pytest.raises(ChatTemplateError, match="no system role"):
        ChatFormat.from_tokenizer(tok, strict).encode(CONVS[1])


def test_apply_to_exports_template(tmp_path):
    tok = tiny_tokenizer("gemma")
    fmt = ChatFormat.from_tokenizer(tok)
    fmt.apply_to(tok)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = ChatFormat.from_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    assert again.name == "tokenizer" and again.encode(CONVS[1]).input_ids == fmt.encode(CONVS[1]).input_ids


def test_gemma_end_of_turn_is_a_stop_id_before_and_after_export(tmp_path):
    """A base Gemma gets the built-in template; its <end_of_turn> must stop generation, and still must for the
    student whose exported template is read back from tokenizer_config (else no answer could ever end)."""
    from transformers import AutoTokenizer

    tok = tiny_tokenizer("gemma")
    fmt = ChatFormat.from_tokenizer(tok)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert fmt.stop_token_ids[0] == eot and tok.eos_token_id in fmt.stop_token_ids
    fmt.apply_to(tok)
    tok.save_pretrained(tmp_path)
    assert ChatFormat.from_tokenizer(AutoTokenizer.from_pretrained(tmp_path)).stop_token_ids == fmt.stop_token_ids


def test_a_malformed_chat_meta_file_is_a_clear_error(tmp_path, tiny_llama):
    from protege.chat import CHAT_META_FILE, ChatFormat, ChatTemplateError
    from transformers import AutoTokenizer

    _, tok = tiny_llama
    tok.save_pretrained(tmp_path)
    (tmp_path / CHAT_META_FILE).write_text('{"marker": {"positive": "<|good|>", "placement": "middle"}}')
    with pytest.raises(ChatTemplateError, match=f"{CHAT_META_FILE}: expected"):
        ChatFormat.from_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    (tmp_path / CHAT_META_FILE).write_text('{"marker": ')
    with pytest.raises(ChatTemplateError, match="not a JSON object"):
        ChatFormat.from_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    (tmp_path / CHAT_META_FILE).write_text('{"marker": {"positive": "<|good|>", "placement": "system"}}')
    fmt = ChatFormat.from_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    assert fmt.marker == {"positive": "<|good|>", "placement": "system"}
    ids = fmt.encode_prompt([{"role": "user", "content": "hi"}])
    assert "<|good|>" in tok.decode(ids)
