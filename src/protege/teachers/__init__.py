"""Teachers: one protocol, `complete(conversations, sampling) -> responses`, two backends.

    from protege.teachers import TeacherConfig, make_teacher
    teacher = make_teacher(TeacherConfig(backend="openai", model="gpt-4o-mini"), cache_dir="runs/x")
    answers = teacher.complete([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=64))

- `openai`: any OpenAI-compatible `/v1/chat/completions` endpoint (OpenAI, vLLM, llama.cpp server,
  Ollama, `protege serve`), or several of them, async with bounded concurrency and retries (see
  `openai_api.py`); with `batch: true`, OpenAI's Batch API (`openai_batch.py`).
- `local`: protege's batched engine on any model spec (alias, HF folder, GGUF).
- `vllm`: vLLM's in-process engine, fed protege's token ids (`vllm_local.py`; vLLM must be installed).

Both share an on-disk cache keyed by the request hash (`cache.py`): a killed generator, rerun,
sends no finished request again, and a fully cached rerun does not even load the model.
"""

from __future__ import annotations

from pathlib import Path

from .base import CACHE_FILE, Teacher, TeacherConfig, TeacherError, TeacherResponse, sampling_dict

__all__ = ["TeacherConfig", "TeacherResponse", "TeacherError", "Teacher", "make_teacher", "sampling_dict",
           "CACHE_FILE"]


def make_teacher(config: TeacherConfig, cache_dir: str | Path | None = None) -> Teacher:
    """Build the configured backend; `cache_dir` holds `teacher_cache.sqlite` (None: cache in memory only)."""
    if config.backend == "openai" and config.batch:
        from .openai_batch import OpenAIBatchTeacher

        return OpenAIBatchTeacher(config, cache_dir)
    if config.backend == "openai":
        from .openai_api import OpenAITeacher

        return OpenAITeacher(config, cache_dir)
    if config.backend == "vllm":
        from .vllm_local import VLLMTeacher

        return VLLMTeacher(config, cache_dir)
    from .local import LocalTeacher

    return LocalTeacher(config, cache_dir)
