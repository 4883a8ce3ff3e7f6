"""Models: built-in offline aliases (`registry`), pulling them (`pull`), loading any model (`load`),
and shims over transformers versions (`compat`)."""

from .compat import cache_kwarg, output_cache
from .load import load, load_tokenizer, quantization_kwargs, resolve
from .pull import PullConfig, gguf_path, pull, run_pull
from .registry import ALIASES, DEFAULT_JUDGE, Alias, ModelError, alias_dir, is_pulled, protege_home

__all__ = ["ALIASES", "DEFAULT_JUDGE", "Alias", "ModelError", "protege_home", "alias_dir", "pull", "is_pulled", "gguf_path",
           "resolve", "load", "load_tokenizer", "quantization_kwargs", "cache_kwarg", "output_cache", "PullConfig",
           "run_pull"]
