"""Peak memory and speed of protege's training and decoding at each precision, with nothing downloaded.

    python benchmarks/gpu_check.py                 # one GPU: Llama-3-8B and gemma-3-270m shapes (< 8 min on an H100)
    python benchmarks/gpu_check.py --smoke         # tiny shapes on the CPU (the test suite runs this)
    python benchmarks/gpu_check.py --shapes gemma-3-270m --json out.json

Models are built from transformers configs with random weights (the shapes of Llama-3-8B and
gemma-3-270m), so the numbers say what protege's own code costs, not what a checkpoint knows. Per
shape and setting (fp32 / bf16 LoRA, bf16 LoRA + gradient checkpointing, nf4 QLoRA + checkpointing, and
the bf16 LoRA + checkpointing model sharded with FSDP2, and with DeepSpeed ZeRO-3, on one process):
- SFT: one LoRA step through protege's `SFTModule` (fused chunked cross-entropy) + AdamW on a
  batch of 1 x `--seq` tokens, every token labelled: tokens/s and peak memory;
- DPO: one step through `PolicyLogprobs` + `dpo_loss` on one pair packed in one row of `--seq`
  tokens (reference log-probs with the adapters off, as `train dpo` computes them);
- decode: protege's engine, greedy, 64 new tokens at batch 1 / 16 / 64: new tokens/s.
Goal (issue: fit a 7B on one GPU): Llama-3-8B shape, 1 x 2048 tokens, bf16 LoRA with checkpointing and
nf4 QLoRA each under 24 GB peak. Peak memory is torch's `max_memory_allocated` (CUDA) or the process's
peak RSS growth (CPU, coarse).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json)
    "llama-3-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    # google/gemma-3-270m
    "gemma-3-270m": dict(arch="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                         num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                         sliding_window=512, max_position_embeddings=32768, query_pre_attn_scalar=256,
                         tie_word_embeddings=True),
    # --smoke: two layers, 64 wide (bitsandbytes quantizes in blocks of 64)
    "tiny-llama": dict(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}
SETTINGS = {  # name -> (precision, quantization, gradient checkpointing)
    "fp32 lora": ("fp32", "none", False),
    "bf16 lora": ("bf16", "none", False),
    "bf16 lora+ckpt": ("bf16", "none", True),
    "nf4 qlora+ckpt": ("bf16", "nf4", True),
    # the same LoRA model sharded with FSDP2 (`fully_shard` per decoder layer, as recipes/accelerate/fsdp2.yaml
    # does) on one process: what sharding costs before there is a second GPU to share with
    "fsdp2 bf16 lora+ckpt": ("bf16", "none", True),
    # ... and inside a DeepSpeed ZeRO-3 engine (bf16 weights, fp32 master copy in the ZeRO optimizer), as
    # recipes/accelerate/zero3.yaml runs it
    "zero3 bf16 lora+ckpt": ("bf16", "none", True),
}


@dataclass
class Row:
    shape: str
    setting: str
    test: str
    tokens_per_s: float | None
    peak_gb: float | None
    note: str = ""


def build(shape: str, dtype: torch.dtype, device: str) -> Any:
    """A random-weight causal LM of `shape`, built directly on `device` in `dtype` (no download)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    config = (LlamaConfig if arch == "llama" else Gemma3TextConfig)(**spec, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def quantize(model: Any, kind: str, compute_dtype: torch.dtype) -> Any:
    """Swap every decoder Linear for a bitsandbytes one holding the same (random) weights, quantized on
    their device: what `from_pretrained(quantization_config=...)` does for a checkpoint."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            device = child.weight.device
            if kind == "nf4":
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=compute_dtype, quant_type="nf4", quant_storage=torch.uint8)
                new.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                               quant_storage=torch.uint8)
            else:
                raise ValueError(kind)
            setattr(module, child_name, new.to(device))
    return model


class _AnyIds:
    """protege's tiny tokenizer, decoding any id of a big random model's vocabulary (id mod its size):
    the engine streams text, and the decoded text of random weights means nothing anyway."""

    def __init__(self, tok: Any):
        self._tok = tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def decode(self, ids: Any, **kw: Any) -> str:
        return self._tok.decode([int(i) % len(self._tok) for i in ids], **kw)


_OWN_GROUP: list[str] = []  # the one-process group fsdp2()/zero3() started (ended after each test: see end_group)
_OWN_ENV: list[str] = []  # launcher variables zero3() set (removed again by end_group)


def end_group() -> None:
    """End the process group fsdp2() started, so that whoever imported this module (the test suite) is left
    without one (and without the launcher variables DeepSpeed asked for)."""
    import torch.distributed as dist

    while _OWN_ENV:
        os.environ.pop(_OWN_ENV.pop(), None)

    while _OWN_GROUP:
        dist.destroy_process_group()
        os.unlink(_OWN_GROUP.pop())


def _one_process_group(device: str) -> None:
    import tempfile

    import torch.distributed as dist

    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="gpu-check-", delete=False).name
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{store}",
                                rank=0, world_size=1)
        _OWN_GROUP.append(store)


def fsdp2(model: Any, device: str) -> Any:
    """`fully_shard` every decoder layer and then the whole model on a one-process group (bf16 compute,
    fp32 gradient reduction), as accelerate's FSDP2 preparation does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _one_process_group(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def zero3(module: Any, device: str) -> Any:
    """A DeepSpeed ZeRO-3 engine (bf16) around protege's module on a one-process group, with the weights the
    loss reads directly registered as `fit` registers them (`sharding.direct_weights`)."""
    import deepspeed

    from protege.train.sharding import direct_weights

    _one_process_group(device)
    for key, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):  # what a launcher would set
        if key not in os.environ:
            os.environ[key] = value
            _OWN_ENV.append(key)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": False,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=config)
    for p in direct_weights(module):
        deepspeed.zero.register_external_parameter(module, p)
    return engine


def lora_model(model: Any, checkpointing: bool) -> Any:
    from protege.train.model import prepare_model
    from protege.train.sft import SFTConfig

    config = SFTConfig(model="x", datasets=["x"], gradient_checkpointing=checkpointing,
                       lora={"r": 16, "alpha": 32, "dropout": 0.05, "trainable_tokens": "none"})
    peft = prepare_model(config, model, chat=None)
    peft.train()
    return peft


@contextlib.contextmanager
def peak(device: str):
    """Yields a dict that gets `gb`: peak memory inside the block."""
    out: dict[str, float] = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out["gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        from protege.train.state import peak_rss_mb

        yield out
        out["gb"] = peak_rss_mb() / 1024  # the process's peak so far: coarse on CPU


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _fastest_step(loss_fn: Any, opt: Any, device: str, autocast: torch.dtype | None, steps: int) -> float:
    """Seconds of the fastest of `steps` optimizer steps (forward under autocast, backward, AdamW), after one
    untimed warm-up step (allocator, kernels). `opt` may be a DeepSpeed engine, which backpropagates and steps."""
    engine = opt if hasattr(opt, "set_gradient_accumulation_boundary") else None
    ctx = torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()
    times = []
    for _ in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        with ctx:
            loss = loss_fn()
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def sft_step(model: Any, seq: int, device: str, autocast: torch.dtype | None, steps: int, shard: str = "") -> float:
    from protege.train.sft import SFTModule

    module = SFTModule(model, logits_chunk=1024)
    if shard == "fsdp2":  # the trainer's wrapper is the FSDP root, as in `fit` (its forward gathers the embedding and head)
        module = fsdp2(module, device)
    if shard == "zero3":  # the engine keeps bf16 weights itself: no autocast
        module = opt = zero3(module, device)
        autocast = None
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, seq), device=device)
    pos = torch.arange(seq, device=device)[None]
    return seq / _fastest_step(lambda: module(ids, pos, ids, normalizer=float(seq)), opt, device, autocast, steps)


def dpo_step(model: Any, seq: int, device: str, autocast: torch.dtype | None, steps: int, shard: str = "") -> float:
    from protege.train.policy import PolicyLogprobs
    from protege.train.losses import dpo_loss

    module = PolicyLogprobs(model, logits_chunk=1024)
    if shard == "fsdp2":
        module = fsdp2(module, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    half, prompt = seq // 2, seq // 8  # one pair packed in one row: [prompt+chosen][prompt+rejected]
    ids = torch.randint(3, model.config.vocab_size, (1, seq), device=device)
    pos = torch.cat([torch.arange(half), torch.arange(seq - half)]).to(device)[None]
    answer = [i for s in (0, half) for i in range(s + prompt, s + (half if s == 0 else seq - half))]
    index = torch.tensor([i - 1 for i in answer], device=device)
    target = ids[0, torch.tensor(answer, device=device)]
    owner = torch.tensor([0 if i < half else 1 for i in answer], device=device)
    args = (ids, pos, None, index, target, owner, 2)

    def loss() -> torch.Tensor:
        with torch.no_grad(), model.disable_adapter():
            ref = module(*args)
        logps = module(*args)
        return dpo_loss(logps[0:1], logps[1:2], ref[0:1], ref[1:2], beta=0.1)[0].sum()

    return seq / _fastest_step(loss, opt, device, autocast, steps)


def decode(model: Any, batch: int, new_tokens: int, device: str) -> float:
    from protege.chat import ChatFormat
    from protege.engine import Engine, SamplingParams
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' in-process tokenizer
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    eng = Engine(model, _AnyIds(tok), chat_format=ChatFormat.from_tokenizer(tok), max_batch_size=batch)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (32,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=[])
    eng.generate(prompts[:1], SamplingParams(max_new_tokens=2, stop_token_ids=[]))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    _sync(device)
    return sum(o.completion_tokens for o in outs) / (time.perf_counter() - t0)


def run(shapes: list[str], settings: list[str], seq: int, batches: list[int], new_tokens: int, steps: int,
        device: str) -> list[Row]:
    rows: list[Row] = []

    def record(shape: str, setting: str, test: str, fn: Any) -> None:
        try:
            with peak(device) as mem:
                rate = fn()
            rows.append(Row(shape, setting, test, round(rate, 1), round(mem["gb"], 2)))
        except torch.cuda.OutOfMemoryError:
            rows.append(Row(shape, setting, test, None, None, "out of memory"))
        except Exception as err:  # report and go on: one failing setting must not hide the others
            rows.append(Row(shape, setting, test, None, None, f"{type(err).__name__}: {str(err)[:120]}"))
        r = rows[-1]
        print(f"{shape:14s} {setting:16s} {test:14s} "
              f"{'-' if r.tokens_per_s is None else f'{r.tokens_per_s:10.1f}'} tok/s  "
              f"{'-' if r.peak_gb is None else f'{r.peak_gb:7.2f}'} GB  {r.note}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()

    for shape in shapes:
        for setting in settings:
            precision, quant, ckpt = SETTINGS[setting]
            if quant != "none":
                try:
                    import bitsandbytes  # noqa: F401
                except ImportError:
                    rows.append(Row(shape, setting, "sft", None, None, "bitsandbytes not installed"))
                    continue
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            autocast = None if precision == "fp32" else torch.bfloat16
            # DPO here scores the reference inside the step (adapters off); `train dpo` precomputes it, and under
            # FSDP2 a no-grad forward of the same sharded module before the trained one is not what it runs.
            shard = setting.split()[0] if setting.split()[0] in ("fsdp2", "zero3") else ""
            for test in ("sft",) if shard else ("sft", "dpo"):
                def step(test: str = test) -> float:
                    model = build(shape, dtype, device)
                    if quant != "none":
                        model = quantize(model, quant, dtype)
                    model = lora_model(model, ckpt)
                    fn = sft_step if test == "sft" else dpo_step
                    try:
                        return fn(model, seq, device, autocast, steps, shard=shard)
                    finally:
                        del model
                        end_group()
                record(shape, setting, f"{test} 1x{seq}", step)
        for precision in ("fp32", "bf16") if device == "cpu" or shapes != ["llama-3-8b"] else ("bf16",):
            if precision not in {SETTINGS[s][0] for s in settings}:
                continue
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            for b in batches:
                def dec(b: int = b, dtype: torch.dtype = dtype) -> float:
                    model = build(shape, dtype, device)
                    try:
                        return decode(model, b, new_tokens, device)
                    finally:
                        del model
                record(shape, f"{precision} engine", f"decode b{b}", dec)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, a few seconds (the test suite)")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=None)
    ap.add_argument("--seq", type=int, default=None, help="tokens per training step (default 2048; smoke 64)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per row (default 64; smoke 8)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per training test (after one warm-up)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no GPU here: run with --smoke for the CPU check (the full check needs one CUDA device)")
    if args.smoke:
        shapes, batches = args.shapes or ["tiny-llama"], [1, 4]
        settings = args.settings or ["fp32 lora", "bf16 lora+ckpt", "nf4 qlora+ckpt", "fsdp2 bf16 lora+ckpt",
                                     "zero3 bf16 lora+ckpt"]
        seq, new_tokens = args.seq or 64, args.new_tokens or 8
    else:
        shapes, batches = args.shapes or ["llama-3-8b", "gemma-3-270m"], [1, 16, 64]
        settings = args.settings or list(SETTINGS)
        seq, new_tokens = args.seq or 2048, args.new_tokens or 64
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"gpu_check on {name}: torch {torch.__version__}, shapes {shapes}, {seq} tokens per step", flush=True)
    rows = run(shapes, settings, seq, batches, new_tokens, args.steps, device)
    print("\n| shape | setting | test | tokens/s | peak GB | note |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.shape} | {r.setting} | {r.test} | {r.tokens_per_s if r.tokens_per_s is not None else '-'} | "
              f"{r.peak_gb if r.peak_gb is not None else '-'} | {r.note} |")
    if device == "cuda":
        for setting in ("bf16 lora+ckpt", "nf4 qlora+ckpt"):
            fit = [r for r in rows if r.shape == "llama-3-8b" and r.setting == setting and r.test.startswith("sft")]
            if fit and fit[0].peak_gb is not None:
                print(f"llama-3-8b {setting}: peak {fit[0].peak_gb:.1f} GB for 1 x {seq} tokens "
                      f"({'fits' if fit[0].peak_gb <= 24 else 'does NOT fit'} in 24 GB)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=2)


if __name__ == "__main__":
    main()
