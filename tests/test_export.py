"""`protege export`: merged HF folder and GGUF files checked in real llama.cpp (llama-cpp-python).

Tiny random LLaMA and Gemma-3 models go through llama.cpp's own converter; the F16 file must give the
same greedy tokens in llama.cpp as protege's engine on the fp32 model, and the chat prompt llama.cpp
builds from the GGUF's template must be ChatFormat's, token for token.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from protege.engine import Engine, SamplingParams  # noqa: E402
from protege.errors import StageError  # noqa: E402
from protege.export import ExportConfig, run  # noqa: E402


def _converter_or_skip():
    from protege.export.gguf import converter_dir

    try:
        return converter_dir()
    except StageError as err:
        pytest.skip(f"llama.cpp's converter is not available: {err}")


@pytest.fixture(params=["llama", "gemma"])
def exported(request, tmp_path_factory):
    from tiny import tiny_model

    _converter_or_skip()
    model, tok = tiny_model(request.param, seed=0)
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    src = root / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = root / "out"
    result = run(ExportConfig(model=str(src), out_dir=str(out), gguf=["f16"], verify_prompts=16, verify_tokens=32,
                              ppl_n=6))
    return request.param, model, tok, out, result


def test_f16_round_trips_through_llama_cpp(exported):
    arch, model, tok, out, result = exported
    report = json.loads((out / "verify.json").read_text())
    parity = report["parity"]
    assert parity["prompts"] == 16 and parity["equal"] >= 14, parity["rows"]
    # Random tiny models have nearly flat logits; llama.cpp may only part ways with the fp32 engine where
    # the fp32 model itself was within F16 rounding of choosing llama.cpp's token.
    assert parity["max_margin_at_divergence"] is None or parity["max_margin_at_divergence"] < 0.02, parity["rows"]
    assert report["template"]["ok"], report["template"]
    assert not report["template"]["double_bos"]
    row = report["perplexity"]["rows"][0]
    assert row["type"] == "f16" and abs(row["delta_ppl"]) < 0.01 * report["perplexity"]["hf_fp32"]
    assert result["greedy_equal"] == f"{parity['equal']}/16" and (out / "manifest.json").is_file()


def test_hf_folder_has_template_stop_ids_and_card(exported):
    from transformers import AutoTokenizer, GenerationConfig

    from protege.chat import ChatFormat

    arch, model, tok, out, _ = exported
    hf = out / "hf"
    chat = ChatFormat.from_tokenizer(AutoTokenizer.from_pretrained(hf))
    gen = GenerationConfig.from_pretrained(hf)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eot = "<end_of_turn>" if arch == "gemma" else "<|im_end|>"
    assert tok.convert_tokens_to_ids(eot) in eos and tok.eos_token_id in eos
    assert chat.name == "tokenizer" and eot in chat.template
    card = (hf / "README.md").read_text()
    assert "base model" in card and "end-of-turn ids" in card


def test_gguf_metadata_is_consistent_with_the_template(exported):
    from protege.engine.gguf import read_metadata

    arch, model, tok, out, _ = exported
    meta = read_metadata(next(out.glob("*-f16.gguf")))
    assert meta["general.architecture"] == ("gemma3" if arch == "gemma" else "llama")
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    template = meta["tokenizer.chat_template"]
    # Whatever the template renders at its start, llama.cpp must not add a second BOS (checked above);
    # here: the rule that gets there (BOS from add_bos_token, not from the template).
    if meta.get("tokenizer.ggml.add_bos_token"):
        assert not template.lstrip().startswith("{{ bos_token }}") and "bos_token }}" not in template[:40]


def test_llama_cpp_engine_serves_the_gguf_like_the_torch_engine(exported):
    from protege.engine.llamacpp import LlamaCppEngine

    arch, model, tok, out, _ = exported
    gguf = next(out.glob("*-f16.gguf"))
    eng = LlamaCppEngine(gguf)
    ref = Engine(model, tok)
    messages = [{"role": "user", "content": "Name the capital of France."}]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    mine = eng.chat([messages], params)[0]
    theirs = ref.chat([messages], params)[0]
    assert mine.token_ids == theirs.token_ids and mine.text == theirs.text
    # Per-token log-probabilities (the server's `logprobs`) agree with the torch engine's (F16 weights)
    lp = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=2)
    mine_lp, theirs_lp = eng.chat([messages], lp)[0], ref.chat([messages], lp)[0]
    assert mine_lp.token_ids == theirs.token_ids and len(mine_lp.logprobs) == len(mine_lp.token_ids)
    for a, b in zip(mine_lp.logprobs, theirs_lp.logprobs):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=2e-2)
        assert [t for t, _ in a.top] == [t for t, _ in b.top] and a.top[0][1] == pytest.approx(a.logprob)
    # A stop id ends the turn: make the first greedy token a stop token.
    first = theirs.token_ids[0]
    stopped = eng.generate([eng.chat_format.encode_prompt(messages)],
                           SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[first]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == [first]


def test_llama_cpp_option_logprobs_match_torch(exported):
    """Log-prob judge verdicts read from llama.cpp equal the torch engine's (F16 file, tiny model)."""
    from protege.engine.llamacpp import LlamaCppEngine

    _, model, tok, out, _ = exported
    eng, ref = LlamaCppEngine(next(out.glob("*-f16.gguf"))), Engine(model, tok)
    prompts = [ref.chat_format.encode_prompt([{"role": "user", "content": q}]) for q in ("Which is better?", "Hi")]
    firsts = sorted({ids[0] for ids in [tok.encode(x, add_special_tokens=False) for x in ("A", "B", "tie", "x")]})
    options = [[t] for t in firsts]
    mine = dict(eng.option_logprobs(prompts, options))
    theirs = dict(ref.option_logprobs(prompts, options))
    for i in range(len(prompts)):
        assert mine[i] == pytest.approx(theirs[i], abs=2e-2)
    with pytest.raises(ValueError, match="first token"):
        list(eng.option_logprobs(prompts, [[firsts[0], 1], [firsts[0], 2]]))


def test_quantized_files_are_written_and_measured(tmp_path):
    from tiny import tiny_model

    _converter_or_skip()
    model, tok = tiny_model("llama", seed=1)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    result = run(ExportConfig(model=str(src), out_dir=str(tmp_path / "out"), gguf=["q8_0", "q4_0"], verify=False))
    files = sorted(p.name for p in (tmp_path / "out").glob("*.gguf"))
    assert files == ["out-q4_0.gguf", "out-q8_0.gguf"] and result["gguf_files"] == 2
    from protege.engine.gguf import read_metadata

    assert read_metadata(tmp_path / "out" / "out-q4_0.gguf")["general.file_type"] == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0


def test_bad_inputs_get_clear_errors(tmp_path, tiny_llama):
    from protege.export.hf import resolve_source
    from protege.engine.gguf import open_gguf

    with pytest.raises(StageError, match="neither a model folder"):
        resolve_source(str(tmp_path))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base-model"}))
    with pytest.raises(StageError, match="/nowhere/base-model"):
        resolve_source(str(adapter))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(StageError, match="not a readable GGUF"):
        open_gguf(broken)
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "serve", str(broken), "--port", "9"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "not a readable GGUF" in proc.stderr and "Traceback" not in proc.stderr


def test_gguf_header_reader_matches_gguf_py_and_refuses_a_file_cut_short(exported, tmp_path):
    """protege reads GGUF headers itself (gguf-py's reader takes 8-13 s on gemma-3's 262k-token vocabulary):
    the same scalar and string values as gguf-py's, and a file cut inside its tensor data is refused before
    llama.cpp opens it."""
    from gguf import GGUFReader

    from protege.engine.gguf import read_metadata

    path = next(exported[3].glob("*-f16.gguf"))
    reader = GGUFReader(str(path))
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and len(f.types) == 1}
    assert read_metadata(path) == expected and "general.architecture" in expected
    data = path.read_bytes()
    for name, blob, why in [("cut.gguf", data[:-64], "cut short"), ("header.gguf", data[:200], "inside its header"),
                            ("v1.gguf", data[:4] + b"\x01\x00\x00\x00" + data[8:], "GGUF version 1"),
                            ("be.gguf", data[:4] + b"\x00\x00\x00\x03" + data[8:], "big-endian")]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(StageError, match=why):
            read_metadata(tmp_path / name)


def test_an_unsupported_architecture_lists_the_supported_ones(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from protege.export.hf import save_hf
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer("chatml")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(StageError, match="LlamaForCausalLM"):
        save_hf(str(tmp_path / "gpt2"), tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_builtin_models_export_and_match_in_llama_cpp(alias, tmp_path):
    from conftest import builtin_model

    _converter_or_skip()
    spec = builtin_model(alias)
    run(ExportConfig(model=spec, out_dir=str(tmp_path / "out"), gguf=["f16"], ppl_n=8))
    report = json.loads((tmp_path / "out" / "verify.json").read_text())
    parity = report["parity"]
    # F16 weights: a prompt may part ways only where the fp32 model itself had a near-tie.
    assert parity["prompts"] == 16 and parity["equal"] >= 14, parity["rows"]
    assert parity["max_margin_at_divergence"] is None or parity["max_margin_at_divergence"] < 0.05, parity["rows"]
    assert report["template"]["ok"] and not report["template"]["double_bos"], report["template"]
    if alias == "smollm2-135m-instruct":  # an instruct model ends its turn; llama.cpp must stop there
        assert report["template"]["stops_at_end_of_turn"], report["template"]
    # The exported GGUF loads back through protege.models.load (transformers' GGUF reader) and gives the
    # engine's greedy tokens of the fp32 model.
    from protege.models import load

    gguf = next((tmp_path / "out").glob("*-f16.gguf"))
    back, tok = load(str(gguf))
    ref, _ = load(spec)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    assert Engine(back, tok).chat([messages], params)[0].token_ids == Engine(ref, tok).chat([messages], params)[0].token_ids


def test_openai_client_against_a_served_gguf(exported):
    openai = pytest.importorskip("openai")
    from protege.engine.llamacpp import LlamaCppEngine
    from protege.serve import background_server, create_app

    arch, model, tok, out, _ = exported
    eng = LlamaCppEngine(next(out.glob("*-f16.gguf")))
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    expected = eng.chat([messages], SamplingParams(max_new_tokens=20, temperature=0.0))[0]
    app = create_app(eng, "tiny-gguf")
    with background_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        full = client.chat.completions.create(model="tiny-gguf", messages=messages, temperature=0, max_tokens=20)
        assert full.choices[0].message.content == expected.text
        assert full.usage.completion_tokens == expected.completion_tokens
        chunks = list(client.chat.completions.create(model="tiny-gguf", messages=messages, temperature=0,
                                                     max_tokens=20, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        if len(expected.text) > 4:  # a stop string cuts the reply where it first appears
            cut = expected.text[2:4]
            stopped = client.chat.completions.create(model="tiny-gguf", messages=messages, temperature=0,
                                                     max_tokens=20, stop=[cut])
            assert stopped.choices[0].message.content == expected.text.split(cut, 1)[0]
            assert stopped.choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="tiny-gguf", messages=messages, max_tokens=10**6)
        with pytest.raises(openai.BadRequestError, match="torch engine"):  # JSON modes: protege's engine only
            client.chat.completions.create(model="tiny-gguf", messages=messages, max_tokens=4,
                                           response_format={"type": "json_object"})


def test_a_model_with_protege_trained_tokenizer_exports_to_gguf(tmp_path):
    """`train tokenizer`'s BPE (GPT-4 split + byte level) is declared as llama.cpp's llama-bpe pre-tokenizer:
    without it llama.cpp's converter refuses any tokenizer whose hash it does not know."""
    import torch
    from transformers import LlamaForCausalLM

    from protege.train.llama import shape_for
    from protege.train.tokenizer import TokenizerConfig, build

    _converter_or_skip()
    texts = [f"the {a} sat on the {b}. {a} {b} {i} times; def f(x): return x + {i}"
             for i, (a, b) in enumerate([("cat", "mat"), ("dog", "log"), ("owl", "hill")] * 40)]
    tok = build(TokenizerConfig(vocab_size=400, min_frequency=1), iter(texts))
    torch.manual_seed(0)
    shape = shape_for(len(tok), depth=2, aspect_ratio=32, head_dim=16)
    model = LlamaForCausalLM(shape.config(128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    result = run(ExportConfig(model=str(src), out_dir=str(tmp_path / "out"), gguf=["f16"], verify_prompts=8,
                              verify_tokens=16, ppl_n=4))
    report = json.loads((tmp_path / "out" / "verify.json").read_text())
    assert report["parity"]["equal"] >= 7 and report["template"]["ok"], report
    assert result["gguf_files"] == 1


def test_the_converter_download_is_pinned_by_hash(tmp_path, monkeypatch):
    """Issue 31 (LOW): the converter's source package was pinned by version only. A file on the index whose
    sha256 differs from the pinned one is refused (a local index stands in for PyPI)."""
    import io
    import tarfile

    from protege.export import gguf

    version = llama_cpp.__version__
    index = tmp_path / "index"
    index.mkdir()
    with tarfile.open(index / f"llama_cpp_python-{version}.tar.gz", "w:gz") as tar:
        data = b"print('not the real converter')\n"
        info = tarfile.TarInfo(f"llama_cpp_python-{version}/vendor/llama.cpp/convert_hf_to_gguf.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("PROTEGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PROTEGE_LLAMA_CPP", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setitem(gguf._SDIST_SHA256, version, "0" * 64)
    with pytest.raises(StageError, match="sha256 does not match"):
        gguf.converter_dir()
    assert not (tmp_path / "home" / "llama.cpp" / version).exists()  # nothing unverified was kept
