"""Who decodes RL rollouts: protege's own engine on the live policy, vLLM in this process, or a running
`vllm serve` (TRL's `use_vllm` colocate and server modes).

All three take prompt token ids (rendered by protege's chat format) and give back the sampled ids, the text
and the finish reason; vLLM also gives the log-probability it sampled each token with, so the trainer can see
how far vLLM's numbers are from its own and correct for it (`rl_losses.truncated_is_weights`).

Weights: protege's engine decodes the policy module itself, so it is always current. vLLM holds its own
copy, so after every optimizer step the engine is marked stale (`policy_changed`) and the next `generate`
first pushes the policy's weights:

- in-process (`backend: vllm`): the LoRA update is folded into the weights (`merged_adapters`, restored bit-exactly
  after) and every weight but untouched embeddings is handed to vLLM's in-place
  `reload_weights`; the prefix cache is reset, since its KV entries were computed with the old weights.
  vLLM's engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, as TRL's colocate mode), so
  the tensors are not serialised to another process.
- server (`backend: vllm-server`): the adapter is saved to `adapter_dir/step-N` and loaded with vLLM's
  runtime LoRA route (`POST /v1/load_lora_adapter`, the server started with `--enable-lora` and
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`); rollouts ask for that adapter by name. The server must be able to
  read `adapter_dir` (same machine or a shared filesystem). vLLM's own weight-transfer routes move full
  weights over NCCL or CUDA IPC and need a GPU on both sides; the LoRA route runs anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from pydantic import Field, model_validator

from ..config import StageConfig
from ..errors import StageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from ..chat import ChatFormat
    from ..engine import Engine
    from ..engine.sampling import SamplingParams

__all__ = ["RolloutEngineConfig", "Decoded", "RolloutEngine", "ProtegeRollouts", "VLLMRollouts",
           "VLLMServerRollouts", "make_rollout_engine", "merged_adapters", "merged_weights", "sync_stats"]


class RolloutEngineConfig(StageConfig):
    """Which engine decodes the rollouts, and how its sampling log-probs are reconciled with the trainer's."""

    backend: Literal["protege", "vllm", "vllm-server"] = Field(
        "protege", description="protege: protege's engine on the live policy; vllm: vLLM in this process, "
        "weights pushed after each optimizer step; vllm-server: a running `vllm serve --enable-lora`, the LoRA "
        "adapter loaded after each step")
    url: str | None = Field(None, description="vllm-server: the server's base URL (e.g. http://127.0.0.1:8000)")
    served_model: str | None = Field(None, description="vllm-server: the base model's served name (default: the "
                                     "first model the server lists)")
    adapter_dir: str | None = Field(None, description="vllm-server: where each step's adapter is written for the "
                                    "server to load (default: out_dir/rollout_adapters); the server must read it")
    is_correction: Literal["truncate", "none"] = Field(
        "truncate", description="vLLM's sampling log-probs differ from the trainer's: weight each token's loss by "
        "min(p_trainer / p_vllm, is_cap) (truncated importance sampling, as TRL), or not")
    is_cap: float = Field(2.0, ge=1.0, description="the truncation cap of the importance weight")
    kv_cache_gb: float = Field(1.0, gt=0.0, description="vllm on a CPU: KV-cache space (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0, description="vllm on a GPU: share of its memory "
                                          "vLLM may take (the trainer shares the GPU)")
    timeout: float = Field(600.0, gt=0.0, description="vllm-server: seconds per request")

    @model_validator(mode="after")
    def _server_needs_url(self) -> "RolloutEngineConfig":
        if self.backend == "vllm-server" and not self.url:
            raise ValueError("rollout.backend vllm-server needs rollout.url (the `vllm serve` base URL)")
        return self


@dataclass
class Decoded:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None  # what the engine sampled each token with (vLLM); None: the trainer's own


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Decoded]: ...

    def policy_changed(self) -> None: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def merged_adapters(model: torch.nn.Module, enabled: bool = True):
    """Decode with the LoRA update folded into the weights, then put the exact weights back.

    Unmerged, every adapted Linear runs two extra skinny matmuls per decoded token (gemma-3-270m,
    all-linear r=16, batch 32: rollouts at 0.73x the bare engine's tokens/s). PEFT's `unmerge_adapter`
    subtracts the update again, which is not bit-exact in floating point and would drift the frozen
    weights a little every step, so the merged weights are overwritten with copies taken before.
    """
    layers = [m for m in model.modules() if hasattr(m, "merge") and hasattr(m, "get_base_layer")] if enabled else []
    if (not layers or not hasattr(model, "merge_adapter") or any(getattr(m, "merged", False) for m in layers)
            or any(getattr(m, "disable_adapters", False) for m in layers)  # the reference decodes as it is
            or any(not m.get_base_layer().weight.dtype.is_floating_point for m in layers)):  # a 4/8-bit base
        yield
        return
    saved = [(m.get_base_layer().weight, m.get_base_layer().weight.detach().clone()) for m in layers]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


class ProtegeRollouts:
    """protege's engine decoding the policy module itself (LoRA folded in while it decodes)."""

    def __init__(self, engine: Engine, merge: bool):
        self.engine, self.merge = engine, merge

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Decoded]:
        model = self.engine.model
        was_training = model.training
        model.eval()
        head = model.get_output_embeddings()
        try:
            with merged_adapters(model, self.merge):
                # The engine screens greedy tokens with an int8 copy of the LM head; rebuilding it (262K rows for
                # Gemma) is only needed when training can change the head (PEFT trainable-token rows).
                if head is None or any(p.requires_grad for p in head.parameters()):
                    self.engine.refresh_weights()
                done = self.engine.generate(prompts, params)
        finally:
            model.train(was_training)
        return [Decoded(list(c.token_ids), c.text, c.finish_reason) for c in done]

    def policy_changed(self) -> None:
        pass  # it decodes the live weights

    def close(self) -> None:
        pass


def _hf_name(peft_name: str) -> str:
    """A PEFT-wrapped parameter's name as the HF checkpoint spells it."""
    name = peft_name.removeprefix("base_model.model.")
    for wrapper in (".token_adapter.", ".base_layer.", ".original_module."):
        name = name.replace(wrapper, ".")
    return name


def merged_weights(model: torch.nn.Module, include_embeddings: bool) -> dict[str, torch.Tensor]:
    """The policy's weights in HF checkpoint names, LoRA folded in (call inside `merged_adapters`).

    Every weight but the LoRA factors; the input embedding and LM head only when training changes them
    (trainable-token rows), since they are the largest tensors and otherwise equal the base's."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name or "trainable_tokens_delta" in name or "value_head" in name:
            continue
        hf = _hf_name(name)
        if not include_embeddings and ("embed_tokens" in hf or hf.startswith("lm_head")):
            continue
        out[hf] = p.detach()
    return out


def _changes_embeddings(model: torch.nn.Module) -> bool:
    return any(p.requires_grad and ("trainable_tokens" in n or "embed" in n or "lm_head" in n)
               for n, p in model.named_parameters())


class _PushedWeights:
    """An engine with its own copy of the policy: marked stale after each optimizer step, refreshed by `_push`
    before it next decodes; counts and times the pushes (`sync_stats`)."""

    stale: bool
    syncs: int = 0
    sync_seconds: float = 0.0

    def policy_changed(self) -> None:
        self.stale = True

    def _push(self) -> None:
        raise NotImplementedError

    def _synced(self) -> None:
        if self.stale:
            t0 = time.perf_counter()
            self._push()
            self.stale = False
            self.syncs += 1
            self.sync_seconds += time.perf_counter() - t0


class VLLMRollouts(_PushedWeights):
    """`vllm.LLM` in this process on the policy's base folder; the policy's weights pushed after each step."""

    def __init__(self, model: torch.nn.Module, chat: ChatFormat, base: str, precision: str,
                 cfg: RolloutEngineConfig, max_len: int, max_batch: int, seed: int, full_first_sync: bool = False):
        try:
            import vllm
        except ImportError:
            raise StageError("rollout.backend vllm: vLLM is not installed here. Install it in its own virtualenv "
                             "(README, 'Scaling out') and run protege from there, or use rollout.backend "
                             "vllm-server with a running `vllm serve --enable-lora`") from None
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # weights are handed over in memory, not pickled
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.kv_cache_gb:g}")
        threads = torch.get_num_threads()
        self.model, self.chat = model, chat
        trained = hasattr(model, "peft_config")  # a plain model (rejection sampling) is vLLM's own copy already
        self.llm = vllm.LLM(model=base, dtype=precision, seed=seed, enforce_eager=True, max_num_seqs=max_batch,
                            max_model_len=max_len, logprobs_mode="processed_logprobs",
                            gpu_memory_utilization=cfg.gpu_memory_utilization)
        torch.set_num_threads(threads)  # vLLM lowers the process's threads "for serving"; training wants them all
        self.stale = trained or full_first_sync  # a resumed run's policy differs from the base already
        self.embeddings = _changes_embeddings(model)
        self.full_next = full_first_sync

    def _push(self) -> None:
        with torch.no_grad(), merged_adapters(self.model, True):
            weights = merged_weights(self.model, self.embeddings or self.full_next)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
        self.llm.reset_prefix_cache()  # cached KV came from the old weights
        self.full_next = False

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Decoded]:
        from vllm.inputs import TokensPrompt

        from ..engine.vllm_params import vllm_sampling

        self._synced()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                 [vllm_sampling(p, self.chat, logprobs=0) for p in params], use_tqdm=False)
        return [_decoded(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason,
                         o.outputs[0].logprobs) for o in outs]

    def close(self) -> None:
        del self.llm


def _decoded(ids: Any, text: str, finish: Any, logprobs: Any) -> Decoded:
    ids = [int(t) for t in ids]
    lps = None
    if logprobs is not None:
        lps = [float(step[t].logprob) for t, step in zip(ids, logprobs)]
    return Decoded(ids, text, "length" if finish == "length" else "stop", lps)


class VLLMServerRollouts(_PushedWeights):
    """A running `vllm serve --enable-lora`: completions from token-id prompts, the adapter reloaded per step."""

    def __init__(self, model: torch.nn.Module, chat: ChatFormat, cfg: RolloutEngineConfig, adapter_dir: Path,
                 concurrency: int):
        import httpx

        self.model, self.chat, self.cfg, self.adapter_dir = model, chat, cfg, adapter_dir
        self.base = cfg.url.rstrip("/").removesuffix("/v1")  # type: ignore[union-attr]
        self.http = httpx.Client(timeout=cfg.timeout)
        self.concurrency = concurrency
        # A policy with adapters is loaded into the server after every step; a plain model (rejection sampling
        # from a fixed model) is taken to be the one the server serves.
        trained = hasattr(model, "peft_config")
        if trained and _changes_embeddings(model):
            raise StageError("rollout.backend vllm-server loads the policy as a vLLM LoRA adapter, which cannot carry "
                             "trained embedding rows: set lora.trainable_tokens: none")
        try:
            listed = self.http.get(f"{self.base}/v1/models").json()["data"]
        except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
            raise StageError(f"rollout.url {cfg.url}: no vLLM server answered GET /v1/models ({exc})") from None
        self.served = cfg.served_model or listed[0]["id"]
        self.current: str | None = None if trained else self.served
        self.stale = trained
        self.version = 0

    def _post(self, route: str, body: dict[str, Any]) -> Any:
        r = self.http.post(f"{self.base}{route}", json=body)
        if r.status_code != 200:
            hint = ""
            if "lora" in route and r.status_code in (404, 400):
                hint = (" (start the server with --enable-lora --max-lora-rank R and "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
            raise StageError(f"rollout.url {self.cfg.url}: POST {route} answered {r.status_code}: "
                             f"{r.text[:300]}{hint}")
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    def _push(self) -> None:
        self.version += 1
        name = f"protege-policy-{self.version}"
        path = self.adapter_dir / name
        self.model.save_pretrained(str(path))
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())})
        if self.current is not None and self.current != self.served:
            self._post("/v1/unload_lora_adapter", {"lora_name": self.current})
        self.current = name

    def _one(self, prompt: list[int], p: SamplingParams) -> Decoded:
        from ..engine.driver import request_stops

        stop_ids, stops = request_stops(self.chat, p)
        body = {"model": self.current, "prompt": prompt, "max_tokens": int(p.max_new_tokens),
                "temperature": float(p.temperature), "top_p": float(p.top_p), "top_k": int(p.top_k) or -1,
                "seed": p.seed, "stop": stops or None, "stop_token_ids": sorted(stop_ids),
                "logprobs": 0, "return_token_ids": True, "skip_special_tokens": True}
        choice = self._post("/v1/completions", body)["choices"][0]
        ids = choice.get("token_ids")
        if ids is None:
            raise StageError(f"rollout.url {self.cfg.url}: the server returned no token ids (`return_token_ids` "
                             "needs vLLM >= 0.10.2)")
        lps = (choice.get("logprobs") or {}).get("token_logprobs")
        return Decoded([int(t) for t in ids], choice["text"], "length" if choice.get("finish_reason") == "length"
                       else "stop", [float(x) for x in lps] if lps else None)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Decoded]:
        self._synced()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, prompts, params))

    def close(self) -> None:
        self.http.close()


def vllm_base(spec: str) -> tuple[str, bool]:
    """(the HF folder vLLM loads for the policy `spec`, whether every weight must be pushed at the first sync).

    An adapter folder (an SFT run's output) starts vLLM on its base; the first sync then sends every weight,
    embeddings included, since the adapter may have trained token rows."""
    from ..models import resolve

    path = Path(resolve(spec))
    if str(path).endswith(".gguf"):
        raise StageError(f"rollout.backend vllm: the policy {spec} is a .gguf file; give an HF folder or alias")
    adapter = path / "adapter_config.json"
    if adapter.exists():
        return str(resolve(json.loads(adapter.read_text())["base_model_name_or_path"])), True
    return str(path), False


def make_rollout_engine(cfg: RolloutEngineConfig, *, model: torch.nn.Module, tok: PreTrainedTokenizerBase, chat: ChatFormat, spec: str,
                        precision: str, out_dir: Path, max_len: int, max_batch: int, seed: int,
                        merge: bool) -> RolloutEngine:
    """The configured rollout engine over the policy `model` (with tokenizer `tok`) loaded from `spec`."""
    if cfg.backend == "protege":
        from ..engine import Engine

        return ProtegeRollouts(Engine(model, tok, chat, max_batch_size=max_batch), merge)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Each rank would start its own vLLM next to the trainer's process group, or push the same adapter
        # under the same name as every other rank: neither is tested, so neither is offered.
        raise StageError(f"rollout.backend {cfg.backend} runs in one training process; under a multi-process "
                         "launch use rollout.backend protege (each rank decodes its own rollouts)")
    if cfg.backend == "vllm":
        base, full = vllm_base(spec)
        return VLLMRollouts(model, chat, base, precision, cfg, max_len, max_batch, seed, full_first_sync=full)
    return VLLMServerRollouts(model, chat, cfg, Path(cfg.adapter_dir or out_dir / "rollout_adapters"), max_batch)


def sync_stats(engine: RolloutEngine) -> dict[str, float]:
    """How often and how long the policy's weights were pushed to vLLM (empty for protege's engine)."""
    if not isinstance(engine, _PushedWeights):
        return {}
    return {"weight_syncs": float(engine.syncs), "weight_sync_seconds": round(engine.sync_seconds, 3)}
