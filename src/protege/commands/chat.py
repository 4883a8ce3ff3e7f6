"""`protege chat`: talk to a model in the terminal (local, or a running OpenAI-compatible server)."""

from __future__ import annotations

import argparse
from typing import Any

from . import Subparsers

ORDER = 90


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: none)")


def register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "chat", help="interactive terminal chat with a model or a running server (streams replies)",
        description="Chat in the terminal. Inside: /system TEXT sets the system prompt, /reset starts over, "
                    "/exit quits. MODEL is a built-in alias, an HF folder or a .gguf, loaded here; with --url, "
                    "MODEL (optional) is the name the server knows its model by.")
    p.add_argument("model", nargs="?", help="alias, HF folder or .gguf to load; with --url, the server's model name "
                                            "(default: the first model the server lists)")
    p.add_argument("--url", help="talk to an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key-env", default="PROTEGE_API_KEY",
                   help="environment variable holding the server's API key (default: %(default)s)")
    p.add_argument("--precision", default="auto", help="local model: auto, fp32, bf16 or fp16 (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="server: seconds before a reply is abandoned "
                                                                "(default: %(default)s)")
    p.add_argument("--system", default=None, help="system prompt to start with")
    add_sampling_flags(p)
    p.set_defaults(func=_chat)


def _flag_error(err: Any, flags: dict[str, str]) -> SystemExit:
    e = err.errors()[0]
    name = str(e["loc"][0])
    return SystemExit(f"protege chat: {flags.get(name, '--' + name.replace('_', '-'))}: {e['msg']} (got {e['input']!r})")


def _chat(args: argparse.Namespace) -> int:
    """Who answers is a TeacherConfig, as in every stage; how it samples is the config's Sampling."""
    from pydantic import ValidationError

    from ..chat_repl import Sampling, backend_for, run_repl
    from ..teachers.base import TeacherConfig

    if not args.model and not args.url:
        raise SystemExit("protege chat: give a MODEL to load here, or --url URL of a running server")
    try:
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_tokens, seed=args.seed)
    except ValidationError as err:
        raise _flag_error(err, {"max_new_tokens": "--max-tokens"}) from None
    if args.url:
        url = args.url.rstrip("/")
        url += "" if url.endswith("/v1") else "/v1"  # http://127.0.0.1:8000 means its OpenAI API root
        answerer = {"backend": "openai", "base_url": url, "api_key_env": args.api_key_env, "timeout": args.timeout}
    else:
        answerer = {"backend": "local", "precision": args.precision}
    if args.model:
        answerer["model"] = args.model
    try:
        teacher = TeacherConfig(**answerer)
    except ValidationError as err:
        raise _flag_error(err, {"model": "MODEL", "base_url": "--url"}) from None
    return run_repl(backend_for(teacher), sampling, system=args.system)
