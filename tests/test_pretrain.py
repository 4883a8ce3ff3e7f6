"""Pretraining from scratch: tokenizer, corpus readers, packed document-masked rows, the LLaMA builder,
the training stage (loss below unigram entropy, exact resume after kill -9) and the IsoFLOP fit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from protege.corpus import CorpusError, held_out, iter_documents
from protege.errors import RecordError
from protege.scaling.fit import bootstrap, fit_isoflop, synthetic_runs
from protege.train.llama import SizeError, parse_count, shape_for
from protege.train.losses import IGNORE_INDEX
from protege.train.pretrain_data import PackedRows, rows_to_batch, token_byte_lengths
from protege.train.state import lr_lambda
from protege.train.tokenizer import TokenizerConfig, build, bytes_per_token

ANIMALS = ["cat", "dog", "bird", "fox", "owl", "bee"]
PLACES = ["mat", "log", "hill", "barn", "pond"]


def _corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Documents where context predicts the next word: "the cat sat on the mat. the cat was happy." ..."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        a, p = rng.choice(ANIMALS), rng.choice(PLACES)
        docs.append(f"the {a} sat on the {p}. the {a} liked the {p}. then the {a} slept near the {p}.")
    return docs


@pytest.fixture(scope="module")
def bpe():
    texts = _corpus(300) + ["Ünïcödé 漢字 emoji 🙂 tabs\tand\nnewlines", "def f(x): return x ** 2"]
    return build(TokenizerConfig(vocab_size=400, min_frequency=1), iter(texts))


def test_tokenizer_round_trips_any_text_and_has_the_chat_tokens(bpe):
    rng = random.Random(0)
    samples = ["", " ", "\x00\x01\x7f", "日本語のテキスト", "🙂👍🏽 family: 👨‍👩‍👧", "<|im_end|> is text here",
               "\r\n\t  trailing   ", "ﬁ ligature and e\u0301 combining"]
    samples += ["".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x2FFF), rng.randint(0x1F300, 0x1FAFF)]))
                        for _ in range(rng.randint(1, 60))) for _ in range(200)]
    samples += [bytes(rng.randrange(256) for _ in range(50)).decode("utf-8", "replace") for _ in range(50)]
    for s in samples:
        ids = bpe(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert bpe.decode(ids) == s
        assert bpe.unk_token_id is None or bpe.unk_token_id not in ids
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(bpe(t, add_special_tokens=False)["input_ids"]) == 1
    from protege.chat import ChatFormat

    chat = ChatFormat.from_tokenizer(bpe)
    assert chat.name == "tokenizer" and bpe.convert_tokens_to_ids("<|im_end|>") in chat.stop_token_ids
    assert bytes_per_token(bpe, _corpus(20, seed=1)) > 2.0  # merges learned: well above one byte per token


def test_token_byte_lengths_sum_to_utf8_length(bpe):
    from tiny import tiny_tokenizer

    text = _corpus(3)[0] + " Ünïcödé 漢字 🙂\n\tend"
    for tok in (bpe, tiny_tokenizer("chatml")):
        lens = token_byte_lengths(tok)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert int(lens[ids].sum()) == len(text.encode("utf-8"))
        assert int(lens[tok.eos_token_id]) == 0


def test_corpus_readers(tmp_path):
    txt = tmp_path / "a.txt"
    # A separator straddling the 1 MiB read block must still split the documents.
    first = "x" * ((1 << 20) - 5)
    txt.write_text(first + "<|endoftext|>second doc<|endoftext|>\n\n<|endoftext|>third", encoding="utf-8")
    assert [len(d) for d in iter_documents(str(txt))] == [len(first), 10, 5]
    book = tmp_path / "book.txt"
    book.write_text("one whole book\n\nwith paragraphs")
    assert list(iter_documents(str(book))) == ["one whole book\n\nwith paragraphs"]
    js = tmp_path / "a.jsonl"
    js.write_text('{"text": "hello"}\n{"body": "x"}\n')
    with pytest.raises(RecordError, match=r"a.jsonl:2: field `text`"):
        list(iter_documents(str(js)))
    js.write_text('{"text": "hello"}\n\n{"text": "  "}\n{"text": "world", "id": 3}\n')
    assert list(iter_documents(str(js))) == ["hello", "world"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["p1", "", "p2"]}), tmp_path / "a.parquet")
    assert list(iter_documents(str(tmp_path / "a.parquet"), text_field="content")) == ["p1", "p2"]
    with pytest.raises(CorpusError, match="no column `text`"):
        list(iter_documents(str(tmp_path / "a.parquet")))
    with pytest.raises(CorpusError, match="unknown built-in corpus"):
        list(iter_documents("builtin:nope"))
    docs = list(iter_documents("builtin:python-docs"))
    assert len(docs) > 1000 and sum(map(len, docs)) > 1_000_000
    # The held-out split is a function of the text alone.
    assert [held_out(d, 0.1) for d in docs[:50]] == [held_out(d, 0.1) for d in docs[:50]]
    assert 0.05 < np.mean([held_out(d, 0.1) for d in docs]) < 0.15


def test_rows_restart_positions_at_documents_and_do_not_learn_across_them():
    bos, eos = 1, 2
    tokens = np.array([1, 5, 6, 2, 1, 7, 2, 1, 8, 9, 10, 2, 1], dtype=np.uint16)
    b = rows_to_batch(tokens, [0, 4], 6, bos, eos)
    assert b["input_ids"][0].tolist() == [1, 5, 6, 2, 1, 7]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1]
    assert b["labels"][0].tolist() == [5, 6, 2, IGNORE_INDEX, 7, 2]  # EOS -> next BOS is not learned
    assert b["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2]
    # One token both opens and closes documents (GPT-2 style): the document's last token learns to predict it.
    b = rows_to_batch(np.array([0, 5, 6, 0, 7, 8, 0]), [0], 6, 0, 0)
    assert b["labels"][0].tolist() == [5, 6, 0, 7, 8, 0] and b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2]


def test_packed_rows_are_a_seeded_function_of_the_index():
    plan = PackedRows(n_tokens=10_001, seq_len=10, batch_size=4, epochs=2, seed=3)
    assert len(plan) == 2 * 1000 // 4
    again = PackedRows(n_tokens=10_001, seq_len=10, batch_size=4, epochs=2, seed=3)
    assert [again[i] for i in (499, 0, 250, 7)] == [plan[i] for i in (499, 0, 250, 7)]
    epoch0 = sorted(s for i in range(250) for s in plan[i])
    assert epoch0 == list(range(0, 10_000, 10))  # each row once per epoch
    assert plan[250] != plan[0] and plan[:2] == [plan[0], plan[1]]
    with pytest.raises(IndexError):
        plan[500]


def test_llama_shapes_and_counts():
    from transformers import LlamaForCausalLM

    assert parse_count("3M") == 3e6 and parse_count("250k") == 2.5e5 and parse_count("1.5B") == 1.5e9
    with pytest.raises(SizeError):
        parse_count("big")
    for depth in (1, 3):
        shape = shape_for(1000, depth=depth, aspect_ratio=64, head_dim=32, gqa_group=2)
        model = LlamaForCausalLM(shape.config(128))
        total = sum(p.numel() for p in model.parameters())
        assert total == shape.total
        assert shape.non_embedding == total - 2 * 1000 * shape.width
        assert model.config.num_key_value_heads * 2 == model.config.num_attention_heads
    assert shape_for(4096, model_size="1M").non_embedding == pytest.approx(1e6, rel=0.7)
    # Every size of a ladder is a config transformers accepts, within 25% of what was asked.
    for head_dim, aspect in ((64, 64), (16, 32), (128, 128)):
        for size in ("20K", "150K", "2M", "3M", "40M", "7B"):
            shape = shape_for(32000, model_size=size, aspect_ratio=aspect, head_dim=head_dim)
            shape.config(256)
            assert shape.width % shape.heads == 0 and shape.heads % shape.kv_heads == 0
            if parse_count(size) >= 1e6:
                assert shape.non_embedding == pytest.approx(parse_count(size), rel=0.25)


def test_document_masked_loss_equals_transformers_on_each_document(bpe):
    """protege's packed, fused-head loss over a row of several documents equals LlamaForCausalLM's own loss
    computed on each document separately (same weights)."""
    from transformers import LlamaForCausalLM

    from protege.train.sft import SFTModule

    torch.manual_seed(0)
    shape = shape_for(len(bpe), depth=2, aspect_ratio=32, head_dim=16, gqa_group=2)
    model = LlamaForCausalLM(shape.config(64, bos_token_id=bpe.bos_token_id, eos_token_id=bpe.eos_token_id)).eval()
    bos = bpe.bos_token_id
    docs = [bpe(d, add_special_tokens=False)["input_ids"][:n] for d, n in zip(_corpus(3, seed=2), (9, 14, 20))]
    stream = [t for d in docs for t in [bos, *d]] + [bos]
    batch = rows_to_batch(np.array(stream), [0], len(stream) - 1, bos, bos)
    with torch.no_grad():
        ours = SFTModule(model)(batch["input_ids"], batch["position_ids"], batch["labels"], normalizer=1.0)
        ref = 0.0
        for d in docs:
            ids = torch.tensor([[bos, *d, bos]])
            logits = model(ids).logits[0, :-1]
            ref += torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def test_wsd_schedule():
    f = lr_lambda("wsd", warmup_steps=10, total_steps=100, decay_ratio=0.2)
    assert f(5) < 1 and f(10) == f(50) == f(80) == 1.0 and 0 < f(90) < 1 and f(99) == pytest.approx(0.05)


def test_isoflop_fit_recovers_known_exponents():
    for alpha, beta in ((0.34, 0.28), (0.5, 0.5), (0.25, 0.4)):
        runs = synthetic_runs([1e17, 1e18, 1e19, 1e20], alpha, beta, noise=0.003, seed=1)
        fit = bootstrap(runs, n=200, seed=0)
        a_true, b_true = beta / (alpha + beta), alpha / (alpha + beta)
        assert abs(fit.a - a_true) < 0.05 and abs(fit.b - b_true) < 0.05
        assert fit.intervals["a"][0] < fit.a < fit.intervals["a"][1]
        assert all(b.interior for b in fit.budgets)
    # Sizes that never bracket the optimum: no interior minimum, no law, said so.
    one_sided = [r for r in synthetic_runs([1e18, 1e19], 0.34, 0.28) if r.params > 3e9]
    fit = fit_isoflop(one_sided)
    assert fit.a is None and not any(b.interior for b in fit.budgets)


def _write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    path.write_text("<|endoftext|>".join(_corpus(n, seed)), encoding="utf-8")
    return path


def _pretrain_config(tmp_path: Path, corpus: Path, tok_dir: str, **kw):
    from protege.train.pretrain import PretrainConfig

    return PretrainConfig(**{"datasets": [str(corpus)], "tokenizer": tok_dir, "out_dir": str(tmp_path / "pt"),
                             "depth": 2, "aspect_ratio": 32, "head_dim": 16, "max_length": 64, "batch_size": 4,
                             "max_steps": 60, "learning_rate": 3e-3, "val_fraction": 0.1, "eval_tokens": 4096,
                             "tensorboard": False, "save_every": 10, "precision": "fp32", **kw})


@pytest.fixture(scope="module")
def tok_dir(bpe, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    bpe.save_pretrained(str(d))
    return str(d)


def test_pretraining_learns_below_unigram_entropy_and_saves_a_usable_base(tmp_path, tok_dir):
    from protege.train import pretrain

    corpus = _write_corpus(tmp_path / "c.txt", 400)
    cfg = _pretrain_config(tmp_path, corpus, tok_dir)
    summary = pretrain.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 2.0
    assert summary["eval_loss"] < 0.5 * summary["unigram_entropy"]
    assert 0 < summary["eval_bpb"] < 2 and summary["mfu"] > 0 and "mfu" in rows[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pt" / "model"))
    init = shape_for(len(AutoTokenizer.from_pretrained(str(tmp_path / "pt" / "model"))), depth=2, aspect_ratio=32,
                     head_dim=16)
    assert sum(p.numel() for p in model.parameters()) == init.total
    torch.manual_seed(0)
    fresh = type(model)(model.config)
    assert not torch.allclose(fresh.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    manifest = json.loads((tmp_path / "pt" / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 60 and manifest["config"]["max_steps"] == 60
    # The pretrained folder is a base the rest of protege loads (chat template included).
    from protege.chat import ChatFormat
    from protege.models import load

    m, tok = load(str(tmp_path / "pt" / "model"))
    assert ChatFormat.from_tokenizer(tok).name == "tokenizer"


def test_pretraining_resumes_after_kill_9_with_the_same_weights_and_batches(tmp_path, tok_dir):
    """A real `protege train pretrain` process is killed with SIGKILL after a checkpoint; the rerun continues
    at the same data position and ends with the same weights as an uninterrupted run."""
    import yaml
    from safetensors.torch import load_file

    from protege.train import pretrain

    corpus = _write_corpus(tmp_path / "c.txt", 300, seed=1)
    ref = _pretrain_config(tmp_path, corpus, tok_dir, out_dir=str(tmp_path / "ref"), max_steps=40, save_every=5)
    pretrain.run(ref)
    killed = ref.model_copy(update={"out_dir": str(tmp_path / "killed")})
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(killed.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROTEGE_PRECISION": "fp32"}
    proc = subprocess.Popen([sys.executable, "-m", "protege.cli", "train", "pretrain", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts.exists() and any(p.name.startswith("step-0000001") for p in ckpts.iterdir())):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    summary = pretrain.run(killed)
    assert summary["resumed_from_step"] >= 10
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_scaling_runs_every_pair_fits_and_rereads_finished_runs(tmp_path, tok_dir):
    from protege.scaling.run import ScalingConfig, run

    corpus = _write_corpus(tmp_path / "c.txt", 600, seed=2)
    base = _pretrain_config(tmp_path, corpus, tok_dir, max_steps=None, max_length=32, save_every=0)
    cfg = ScalingConfig(pretrain=base, budgets=[2e9, 6e9], sizes=["5K", "10K", "20K", "40K"], sizes_per_budget=3, min_steps=5, bootstrap=50,
                        out_dir=str(tmp_path / "scaling"))
    summary = run(cfg)
    doc = json.loads((tmp_path / "scaling" / "scaling.json").read_text())
    assert summary["runs"] + summary["skipped"] == 6 and summary["runs"] >= 4 and len(doc["runs"]) == summary["runs"]
    for r in doc["runs"]:  # each run spent its budget (to one step's rounding)
        assert abs(r["flops"] / r["budget"] - 1) < 0.2
    html = (tmp_path / "scaling" / "scaling.html").read_text()
    assert "data:image/png;base64," in html and "IsoFLOP" in html
    stamp = {p: p.stat().st_mtime for p in (tmp_path / "scaling" / "runs").glob("*/manifest.json")}
    run(cfg)  # finished runs are read back, not retrained
    assert {p: p.stat().st_mtime for p in stamp} == stamp
