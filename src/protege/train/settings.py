"""Settings every training method shares (litgpt's one `TrainArgs` for every script).

A method's config subclasses `TrainSettings` and adds only what is its own (SFT: datasets,
packing; DPO: beta, the reference; RM: margins). The fields here are what `fit` and
`prepare_model` read, so a new method cannot drift from the others in how it batches,
schedules, clips, checkpoints or resumes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import StageConfig
from ..precision import PRECISION_HELP, Precision

__all__ = ["LoraSettings", "TrainSettings", "PreferenceSettings", "RESUME_NEUTRAL", "fingerprint"]


Schedule = Literal["cosine", "linear", "constant", "wsd"]  # learning-rate decay after warmup (`state.lr_lambda`)


class LoraSettings(StageConfig):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32.0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field("all-linear", description="module names to adapt, or all-linear (every linear layer but the LM head)")
    trainable_tokens: Literal["auto", "none"] | list[str] = Field(
        "auto", description="tokens whose embedding and LM-head rows are trained too (PEFT trainable tokens): "
        "auto = the chat format's special tokens (role markers, end of turn), none, or a list of token strings")


class TrainSettings(StageConfig):
    model: str = Field("gemma-3-270m", description="base model: built-in alias, HF folder (also a LoRA adapter folder) or .gguf")
    out_dir: str = Field("runs/train", description="where the model, checkpoints, metrics and manifest go")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's / built-in default")
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters (PEFT) or full fine-tuning")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (method: lora)")
    max_length: int = Field(1024, ge=2, description="tokens per sequence; longer ones are truncated (and counted)")
    batch_size: int = Field(4, ge=1, description="rows (SFT) or pairs (RM, DPO) per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step per process")
    epochs: int = Field(1, ge=1, description="passes over each dataset")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (also sets the schedule length)")
    learning_rate: float = Field(2e-4, gt=0.0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (not on biases/norms)")
    schedule: Schedule = Field("cosine", description="LR decay after warmup")
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0, description="fraction of steps of linear warmup")
    decay_ratio: float = Field(0.2, gt=0.0, le=1.0, description="schedule wsd: fraction of steps of the final linear decay")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping norm (0 = off)")
    precision: Precision = Field("auto", description=f"{PRECISION_HELP}. Frozen weights are stored in it, trainable "
                                 "parameters and optimizer state stay fp32, matmuls run under autocast")
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="load the frozen base through bitsandbytes (QLoRA: nf4; LLM.int8: int8); method lora only")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in backward (non-reentrant): activation "
        "memory of one layer at a time, for one more forward of each layer")
    logits_chunk: int = Field(256, ge=1, description="scored positions per LM-head chunk (memory vs speed)")
    seed: int = Field(0, description="seed for data order, LoRA init and dropout")
    eval_dataset: str | None = Field(None, description="held-out records for eval metrics (default: split off eval_fraction)")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="fraction of each dataset held out for eval when eval_dataset is unset")
    eval_max_examples: int = Field(200, ge=0, description="cap on held-out examples")
    save_every: int = Field(100, ge=0, description="checkpoint every N optimizer steps (and always at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    eval_every: int = Field(0, ge=0, description="eval metrics every N steps (0 = only at the end)")
    log_every: int = Field(1, ge=1, description="metrics row every N steps")
    save_merged: bool = Field(False, description="also write the merged full model (LoRA folded in) to out_dir/merged")
    resume: Literal["auto", "yes", "no"] = Field("auto", description="auto: continue from out_dir's checkpoint if the config is unchanged; yes: require one; no: start over")
    tensorboard: bool = Field(True, description="write TensorBoard events next to metrics.jsonl")

    @model_validator(mode="after")
    def _quantized_needs_lora(self) -> "TrainSettings":
        if self.quantization != "none" and self.method != "lora":
            raise ValueError(f"quantization: {self.quantization} trains adapters on a frozen quantized base "
                             "(QLoRA); it needs method: lora")
        return self

    @field_validator("resume", mode="before")
    @classmethod
    def _yaml_yes_no(cls, value: Any) -> Any:
        # YAML reads a bare `yes`/`no` as a boolean.
        return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value


# Keys that may change between a run and its resume without changing what is trained.
RESUME_NEUTRAL = frozenset({"resume", "data_dir", "save_merged", "tensorboard", "log_every", "eval_every", "save_every",
                            "keep_checkpoints", "gradient_checkpointing"})


def fingerprint(config: TrainSettings) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: every key that changes what is trained."""
    out = {k: v for k, v in config.model_dump(mode="json").items() if k not in RESUME_NEUTRAL}
    if out.get("schedule") != "wsd":
        out.pop("decay_ratio", None)  # changes nothing then (and checkpoints from before it existed still resume)
    return out


class PreferenceSettings(TrainSettings):
    """Shared by the methods that learn from preference pairs (RM, DPO)."""

    datasets: list[str] = Field(default_factory=list, description="preference files (protege comparisons, Anthropic HH, TRL, ShareGPT/LLaMA-Factory, UltraFeedback, WebGPT, summarize), trained in this order")
    batch_size: int = Field(8, ge=1, description="pairs per micro-batch per process (their 2 x batch_size sequences are packed)")
    max_length: int = Field(512, ge=2, description="tokens per side (prompt + answer); longer pairs lose prompt tokens first, counted")
