"""`protege chat`: talk to a model in the terminal (local, or a running OpenAI-compatible server)."""

from __future__ import annotations

import argparse
import os
from typing import Any

ORDER = 90


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: none)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "chat", help="interactive terminal chat with a model or a running server (streams replies)",
        description="Chat in the terminal. Inside: /system TEXT sets the system prompt, /reset starts over, "
                    "/exit quits. MODEL is a built-in alias, an HF folder or a .gguf; or use --url.")
    p.add_argument("model", nargs="?", help="alias, HF folder or .gguf to load locally")
    p.add_argument("--url", help="talk to an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key-env", default="PROTEGE_API_KEY",
                   help="environment variable holding the server's API key (default: %(default)s)")
    p.add_argument("--system", default=None, help="system prompt to start with")
    add_sampling_flags(p)
    p.set_defaults(func=_chat)


def _chat(args: argparse.Namespace) -> int:
    from ..chat_repl import LocalBackend, RemoteBackend, Sampling, run_repl

    if bool(args.model) == bool(args.url):
        raise SystemExit("protege chat: give either MODEL or --url URL (exactly one)")
    from pydantic import ValidationError

    try:
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_tokens, seed=args.seed)
    except ValidationError as err:
        flags = {"max_new_tokens": "--max-tokens", "top_p": "--top-p", "top_k": "--top-k"}
        e = err.errors()[0]
        name = str(e["loc"][0])
        raise SystemExit(f"protege chat: {flags.get(name, '--' + name)}: {e['msg']} (got {e['input']!r})") from None
    if args.url:
        backend = RemoteBackend(args.url, api_key=os.environ.get(args.api_key_env))
    else:
        backend = LocalBackend.load(args.model)
    return run_repl(backend, sampling, system=args.system)
