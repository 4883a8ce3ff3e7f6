"""protege's generation engine: batched sampling with a KV cache for any transformers causal LM.

    eng = Engine(model, tokenizer)                      # or Engine.from_spec("gemma-3-270m")
    eng.generate(prompt_id_lists, SamplingParams(max_new_tokens=64))  -> [Completion]
    eng.chat([[{"role": "user", "content": "hi"}]], params)            -> [Completion]
    for delta in eng.stream(prompt_ids, params): print(delta, end="")

Continuous batching (the server): `add_request(ids, params) -> id`, then call `step()`
until `has_pending()` is false; each step returns `StepOutput`s (new token ids, a text
delta, and the `Completion` on a request's last step). `cancel(id)` frees a slot. The engine is
not thread-safe: drive it from one thread.

Weights: "fp32" runs the model as loaded (in the dtype it was loaded in: `engine_for` loads bf16 where
`precision: auto` says so); with a fp32 head on CPU the greedy argmax over the vocabulary is found by
an int8 scan of the LM head plus fp32 rescoring of the 256 leaders (see `head.py`). "int8" (CPU)
also turns the decoder's Linear layers into SmoothQuant int8 ones in place (see `int8.py`): fewer
bytes per token, greedy output close to but not identical with fp32.
"""

from .core import Completion, Engine, RequestDriver, StepOutput
from .sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "Completion", "StepOutput", "engine_for"]


def engine_for(spec: str, backend: str = "auto", precision: str = "auto", max_batch: int = 16) -> RequestDriver:
    """The engine for a model spec: llama.cpp for a `.gguf` when llama-cpp-python is installed (or
    `backend="llama.cpp"`), protege's torch engine otherwise (`backend="torch"` forces it), its weights
    in `precision` (`auto`: bf16 where the device runs it fast; see `protege.precision`)."""
    from ..models import ALIASES, resolve
    from ..precision import resolve_precision

    if spec in ALIASES and not ALIASES[spec].convert:
        spec = resolve(spec)  # a GGUF-only alias (the judge candidates)
    is_gguf = str(spec).endswith(".gguf")
    if backend == "auto":
        try:
            import llama_cpp  # noqa: F401

            backend = "llama.cpp" if is_gguf else "torch"
        except ImportError:
            backend = "torch"
    if backend == "llama.cpp":
        from .llamacpp import LlamaCppEngine

        if not is_gguf:
            raise ValueError(f"the llama.cpp backend runs .gguf files; {spec} is not one")
        return LlamaCppEngine(spec)
    return Engine.from_spec(spec, dtype=resolve_precision(precision).torch_name, max_batch_size=max_batch)
