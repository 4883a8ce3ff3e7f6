"""Making a loaded model trainable the same way for every method: LoRA (with trainable
special-token rows) or full fine-tuning, and the check that protege may split its LM head."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import StageError
from ..lm_head import PLAIN_HEAD_TYPES, LMHeadParts, lm_head_parts
from ..precision import ResolvedPrecision, upcast_trainable
from .settings import TrainSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from ..chat import ChatFormat

__all__ = ["chat_special_tokens", "trainable_token_ids", "base_dtype", "load_base", "prepare_model",
           "require_head_parts", "save_model", "merged_fp32"]


def chat_special_tokens(chat: ChatFormat) -> list[int]:
    """Special-token ids the chat format writes (BOS, role markers, end of turn), pad excluded.

    A base model has rarely or never seen them: gemma-3-270m ranks `<end_of_turn>` ~261,800th of
    262,144 after a finished answer, and LoRA on the linear layers cannot move its embedding or
    LM-head row, so a LoRA student kept talking past every answer (0 of 50 stopped).
    """
    tok = chat.tokenizer
    sample = chat.encode([{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]).input_ids
    special = set(tok.all_special_ids) - {tok.pad_token_id}
    return sorted({i for i in sample if i in special} | set(chat.stop_token_ids))


def trainable_token_ids(config: TrainSettings, chat: ChatFormat) -> list[int]:
    want = config.lora.trainable_tokens
    if want == "none":
        return []
    if want == "auto":
        return chat_special_tokens(chat)
    tok = chat.tokenizer
    ids = tok.convert_tokens_to_ids(list(want))
    unknown = [t for t, i in zip(want, ids) if i is None or i == tok.unk_token_id]
    if unknown:
        raise StageError(f"lora.trainable_tokens: {unknown} are not single tokens of this tokenizer")
    return sorted(set(ids))


def base_dtype(config: TrainSettings, precision: ResolvedPrecision) -> str:
    """The dtype the base weights are loaded in: the run's precision for frozen weights (LoRA), fp32 for
    full fine-tuning (they are the master weights; autocast runs the matmuls in the low precision)."""
    return "float32" if config.method == "full" else precision.torch_name


def load_base(config: TrainSettings, precision: ResolvedPrecision, device: torch.device | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(causal LM, tokenizer) as a trainer starts from it: stored in `base_dtype`, quantized on `device`
    when `quantization` asks (else on the CPU; the caller moves it after `prepare_model`)."""
    from ..models import load

    quantized = config.quantization != "none"
    return load(config.model, dtype=base_dtype(config, precision), device=str(device) if quantized else "cpu",
                quantization=config.quantization)


def _enable_checkpointing(model: torch.nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise StageError(f"gradient_checkpointing: transformers does not support it for model type {kind!r}")
    # Non-reentrant (torch's recommended mode): correct with frozen inputs, so no
    # enable_input_require_grads hook is needed under LoRA.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_model(config: TrainSettings, model: torch.nn.Module, chat: ChatFormat, task_type: str = "CAUSAL_LM",
                  modules_to_save: list[str] | None = None) -> torch.nn.Module:
    """Full fine-tuning: every parameter trains. LoRA: PEFT adapters on `lora.target_modules` plus the
    chat format's special-token rows of the embedding (and of an untied head); `modules_to_save`
    (e.g. a reward model's score head) train in full beside them. Trainable parameters are fp32
    whatever the base's storage (`upcast_trainable`); gradient checkpointing when configured."""
    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        upcast_trainable(model)
        return model
    from peft import LoraConfig, get_peft_model

    ids = trainable_token_ids(config, chat)
    tokens: dict[str, list[int]] | None = None
    if ids:
        names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        tokens = {names[emb]: ids}
        if head is not None and head.weight is not emb.weight:  # tied heads follow the embedding in PEFT
            tokens[names[head]] = ids
    lc = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                    target_modules=config.lora.target_modules, trainable_token_indices=tokens,
                    modules_to_save=modules_to_save, task_type=task_type)
    peft_model = get_peft_model(model, lc)
    upcast_trainable(peft_model)  # PEFT keeps LoRA in fp32 itself; the copied token rows / score head need it
    low_precision_lora(peft_model)
    return peft_model


class _CastingLinear(torch.nn.Linear):
    """A LoRA A/B matrix kept in fp32 (master weight) that computes in its input's dtype: the weight
    (r x in, tiny) is cast per call instead of the activation (B x T x in, large)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


class _Dropout(torch.nn.Dropout):
    """Inverted dropout with a `rand >= p` mask: the same distribution as `nn.Dropout`, whose CPU
    bernoulli kernel cost 15% of a bf16 LoRA step of gemma-3-270m (4 x 256 tokens, 126 LoRA inputs);
    a uniform draw and compare is ~1.7x faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def low_precision_lora(model: torch.nn.Module) -> int:
    """Over a bf16/fp16 base, run each LoRA branch in the base's dtype (fp32 master weights kept).

    PEFT casts every adapted layer's input to the adapter's fp32 before `lora_B(lora_A(dropout(x)))`:
    a (B, T, in) copy per adapted Linear and fp32 matmuls, which with 126 adapted inputs in gemma-3-270m
    (4 x 256 tokens) was ~1 s of a ~5 s bf16 step. Here the input stays in the base's dtype and the
    small (r x in) matrices are cast instead, as autocast would, but also outside autocast (rollouts,
    held-out scoring). Returns how many LoRA layers were switched; a fp32 base is left as it is."""
    n = 0
    for module in model.modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "get_base_layer")):
            continue
        weight = getattr(module.get_base_layer(), "weight", None)
        if weight is None or weight.dtype not in (torch.bfloat16, torch.float16):
            continue  # fp32 base, or a quantized one (its compute dtype is handled by bitsandbytes)
        module.cast_input_dtype_enabled = False
        for bank in (module.lora_A, module.lora_B):
            for linear in bank.values():
                if type(linear) is torch.nn.Linear:
                    linear.__class__ = _CastingLinear
        for name, drop in module.lora_dropout.items():
            if type(drop) is torch.nn.Dropout:
                drop.__class__ = _Dropout
        n += 1
    return n


def require_head_parts(model: torch.nn.Module, method: str) -> LMHeadParts:
    parts = lm_head_parts(model)
    if parts is None:
        kind = getattr(getattr(model, "config", None), "model_type", "?")
        raise StageError(f"{method}: model type {kind!r} is not one whose logits are lm_head(decoder(x)); "
                         f"supported: {', '.join(sorted(PLAIN_HEAD_TYPES))}")
    return parts


def save_model(config: TrainSettings, model: torch.nn.Module, tok: PreTrainedTokenizerBase, chat: ChatFormat, out_dir: Path) -> list[Path]:
    """LoRA adapter (or full model) folder, and the merged model on request, each with tokenizer + template."""
    chat.apply_to(tok)
    outputs = []
    target = out_dir / ("adapter" if config.method == "lora" else "model")
    model.save_pretrained(str(target))
    tok.save_pretrained(str(target))
    outputs.append(target)
    if config.save_merged and config.method == "lora":
        merged = merged_fp32(config, model, target)
        merged.save_pretrained(str(out_dir / "merged"))
        tok.save_pretrained(str(out_dir / "merged"))
        outputs.append(out_dir / "merged")
    return outputs


def merged_fp32(config: TrainSettings, model: torch.nn.Module, adapter_dir: Path | None = None,
                load_fp32: Callable[[], Any] | None = None) -> Any:
    """The base with the adapters folded in, in fp32. A base stored in bf16 or quantized is loaded again in
    fp32 (`load_fp32`, default: the causal LM) and the adapter (`adapter_dir`, else saved to a temporary
    folder) applied to it: folding a fp32 delta into bf16 weights would round it away (bf16 keeps 8 bits
    of mantissa), and a 4-bit base would have to be re-quantized."""
    low = any(p.dtype != torch.float32 for p in model.base_model.parameters()) or config.quantization != "none"
    if not low:
        return model.merge_and_unload()
    import tempfile

    from peft import PeftModel

    if load_fp32 is None:
        from ..models import load

        base = load(config.model, dtype="float32", device="cpu")[0]
    else:
        base = load_fp32()
    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with tempfile.TemporaryDirectory(prefix="protege-adapter-") as tmp:
        model.save_pretrained(tmp)
        return PeftModel.from_pretrained(base, tmp).merge_and_unload()
