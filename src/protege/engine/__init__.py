"""protege's generation engine: batched sampling with a KV cache for any transformers causal LM.

    eng = Engine(model, tokenizer)                      # or Engine.from_spec("gemma-3-270m")
    eng.generate(prompt_id_lists, SamplingParams(max_new_tokens=64))  -> [Completion]
    eng.chat([[{"role": "user", "content": "hi"}]], params)            -> [Completion]
    for delta in eng.stream(prompt_ids, params): print(delta, end="")

Continuous batching (the server): `add_request(ids, params) -> id`, then call `step()`
until `has_pending()` is false; each step returns `StepOutput`s (new token ids, a text
delta, and the `Completion` on a request's last step). `cancel(id)` frees a slot.
"""

from .core import Completion, Engine, StepOutput
from .sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "Completion", "StepOutput"]
