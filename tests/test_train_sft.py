"""End-to-end SFT on tiny models: learning, frozen params, full FT, resume exactness, outputs, CLI, errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from protege.config import ConfigError, load_config
from protege.errors import StageError
from protege.train.sft import SFTConfig, run


def write_chats(path, n=48, seed=0, prefix=""):
    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog sea blue poem capital France Paris".split()
    with open(path, "w") as fh:
        for i in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            msgs = [{"role": "user", "content": f"{prefix}What is {a} plus {b}? " + " ".join(rng.choices(words, k=rng.randint(1, 6)))},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
            if i % 3 == 0:
                msgs += [{"role": "user", "content": "And twice that?"}, {"role": "assistant", "content": f"It is {2 * (a + b)}."}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


@pytest.fixture()
def chats(tmp_path):
    return write_chats(tmp_path / "chats.jsonl")


def cfg(tmp_path, model_dir, data, **kw):
    base = dict(model=str(model_dir), datasets=[data], out_dir=str(tmp_path / "out"), max_length=96, batch_size=4,
                learning_rate=3e-3, max_steps=8, save_every=0, tensorboard=False, warmup_ratio=0.0, seed=0)
    base.update(kw)
    return SFTConfig(**base)


def losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(f"{out_dir}/metrics.jsonl")) if "loss" in r]


def test_lora_learns_and_only_lora_changes(tmp_path, tiny_llama_dir, chats):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = cfg(tmp_path, tiny_llama_dir, chats, max_steps=24, lora={"r": 8, "alpha": 16, "dropout": 0.0},
                 schedule="constant", learning_rate=1e-2)
    summary = run(config)
    curve = losses(config.out_dir)
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.05, curve
    assert summary["eval_loss"] is not None and summary["steps"] == 24
    adapter = tmp_path / "out" / "adapter"
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at zero
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(adapter))
    frozen = {n.replace("base_model.model.", "").replace(".token_adapter", "").replace(".base_layer", ""): p
              for n, p in trained.named_parameters() if "lora_" not in n and "trainable_tokens" not in n}
    for name, p in base.named_parameters():
        assert torch.equal(p, frozen[name]), name
    # ... and the chat format's special tokens (lora.trainable_tokens: auto) got their own rows, in and out
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    merged = trained.merge_and_unload()
    for module in (merged.get_input_embeddings(), merged.get_output_embeddings()):
        ref = (base.get_input_embeddings() if module is merged.get_input_embeddings() else base.get_output_embeddings())
        changed = (module.weight != ref.weight).any(-1).nonzero().flatten().tolist()
        assert eot in changed and set(changed) <= set(tok.all_special_ids), changed
    # the adapter folder is a self-contained model: loads through protege.models.load, template included
    from protege.models import load

    model, tok = load(str(adapter))
    assert "im_start" in tok.chat_template
    assert (tmp_path / "out" / "manifest.json").exists() and (tmp_path / "out" / "config.yaml").exists()


def test_lora_on_tied_gemma_learns_to_end_its_turn(tmp_path, tiny_gemma, chats):
    """LoRA + trainable special tokens on a tied head: the merged student puts more mass on <end_of_turn>."""
    from protege.chat import ChatFormat
    from protege.models import load

    model, tok = tiny_gemma
    model_dir = tmp_path / "tiny-gemma"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    config = cfg(tmp_path, model_dir, chats, max_steps=24, learning_rate=1e-2, schedule="constant", save_merged=True,
                 lora={"r": 8, "alpha": 16, "dropout": 0.0})
    run(config)
    curve = losses(config.out_dir)
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.05, curve
    fmt = ChatFormat.from_tokenizer(tok)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot in fmt.stop_token_ids
    convs = [json.loads(line)["messages"][:2] for line in open(chats)][:8]

    def p_eot(m):
        ps = []
        with torch.no_grad():
            for msgs in convs:
                enc = fmt.encode(msgs)
                end = max(i for i, w in enumerate(enc.assistant_mask) if w)  # the <end_of_turn> label
                assert enc.input_ids[end] == eot
                ps.append(torch.softmax(m(torch.tensor([enc.input_ids[:end]])).logits[0, -1], -1)[eot].item())
        return sum(ps) / len(ps)

    student, _ = load(str(tmp_path / "out" / "merged"))
    emb_before, emb_after = model.get_input_embeddings().weight, student.get_input_embeddings().weight
    changed = (emb_before != emb_after).any(-1).nonzero().flatten().tolist()
    assert eot in changed and set(changed) <= set(tok.all_special_ids), changed
    assert student.get_output_embeddings().weight.data_ptr() == emb_after.data_ptr()  # still tied
    assert p_eot(student) > p_eot(model) + 0.1


def test_full_finetune_gemma_changes_weights(tmp_path, tiny_gemma, chats):
    model, tok = tiny_gemma
    model_dir = tmp_path / "tiny-gemma"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    config = cfg(tmp_path, model_dir, chats, method="full", max_steps=16, learning_rate=5e-3, schedule="constant")
    run(config)
    curve = losses(config.out_dir)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])]
    assert "model.embed_tokens.weight" in changed and any("mlp" in n for n in changed)


def test_resume_is_exact_and_automatic(tmp_path, tiny_llama_dir, chats, capsys):
    straight = cfg(tmp_path, tiny_llama_dir, chats, out_dir=str(tmp_path / "a"), max_steps=10, packing=False,
                   lora={"dropout": 0.1})  # dropout: the RNG state must be restored too
    run(straight)
    split = straight.model_copy(update={"out_dir": str(tmp_path / "b")})
    assert run(split, stop_after_steps=5)["stopped_at_step"] == 5
    capsys.readouterr()
    summary = run(split)  # same command again: resumes on its own and says so
    assert summary["resumed_from_step"] == 5
    assert "resuming from checkpoint" in capsys.readouterr().err
    assert "resuming from checkpoint" in (tmp_path / "b" / "train.log").read_text()
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-6)


def test_changed_config_does_not_resume_silently(tmp_path, tiny_llama_dir, chats):
    config = cfg(tmp_path, tiny_llama_dir, chats, max_steps=4)
    run(config, stop_after_steps=2)
    with pytest.raises(StageError, match="learning_rate"):
        run(config.model_copy(update={"learning_rate": 1e-4}))
    assert run(config.model_copy(update={"learning_rate": 1e-4, "resume": "no"}))["resumed_from_step"] == 0
    with pytest.raises(StageError, match="no checkpoint"):
        run(config.model_copy(update={"out_dir": str(tmp_path / "fresh"), "resume": "yes"}))


def test_progressive_datasets_and_merged_save(tmp_path, tiny_llama_dir):
    first = write_chats(tmp_path / "first.jsonl", n=16, seed=1)
    second = write_chats(tmp_path / "second.jsonl", n=16, seed=2, prefix="Please: ")
    config = cfg(tmp_path, tiny_llama_dir, first, datasets=[first, second], max_steps=None, epochs=1,
                 eval_fraction=0.0, save_merged=True, packing=False)
    summary = run(config)
    assert summary["conversations"] == 32 and summary["steps"] == 8 and summary["eval_loss"] is None
    from protege.models import load

    merged, tok = load(str(tmp_path / "out" / "merged"))
    assert tok.chat_template and not any("lora" in n for n, _ in merged.named_parameters())


def test_cli_runs_sft_from_yaml(tmp_path, tiny_llama_dir, chats, capsys):
    from protege.cli import main

    yaml_path = tmp_path / "sft.yaml"
    yaml_path.write_text(f"model: {tiny_llama_dir}\ndatasets: [{chats}]\nout_dir: {tmp_path / 'cli'}\n"
                         "max_length: 96\nmax_steps: 2\ntensorboard: true\n")
    assert main(["train", "sft", "--config", str(yaml_path), "--lora.r=4"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert list((tmp_path / "cli" / "tensorboard").iterdir())
    assert main(["train", "sft", "--config", str(yaml_path), "--learnin_rate=1"]) == 2
    assert "did you mean `learning_rate`" in capsys.readouterr().err
    assert main(["train", "sft", "--config", str(yaml_path), "--resume", f"--out_dir={tmp_path / 'none'}"]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean `batch_size`"):
        load_config(SFTConfig, overrides=["--batch_sise=2"])
    with pytest.raises(ConfigError, match="method"):
        load_config(SFTConfig, overrides=["--method=qlora"])
    with pytest.raises(StageError, match="datasets"):
        run(SFTConfig(out_dir=str(tmp_path / "x")))
