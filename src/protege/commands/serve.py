"""`protege serve`: OpenAI-compatible API + chat page for a model."""

from __future__ import annotations

import argparse
import os
import sys

from . import Subparsers

ORDER = 95


def register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "serve", help="serve a model: OpenAI-compatible /v1/chat/completions (streaming) and a chat page",
        description="Serve MODEL (alias, HF folder or .gguf) with continuous batching: /v1/chat/completions, "
                    "/v1/models, /health, and a chat page at /. Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("model", help="built-in alias, HF folder or .gguf")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require `Authorization: Bearer $VAR` on /v1/* (default: no key)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default: %(default)s)")
    p.add_argument("--precision", "--dtype", default="auto",
                   choices=["auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                   help="weights precision; auto = bf16 where the device runs it fast (CUDA with bf16, a CPU with "
                        "AMX-BF16 or AVX512-BF16), else fp32 (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "llama.cpp"],
                   help="auto: llama.cpp for .gguf files when llama-cpp-python is installed, else protege's engine")
    p.add_argument("--name", default=None, help="model name reported by /v1/models (default: MODEL)")
    p.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                   help="another name a request's `model` may give (repeatable; '*' accepts any); other names get "
                        "404 model_not_found, as from OpenAI and vLLM")
    p.add_argument("--allow-no-key", action="store_true",
                   help="allow binding beyond loopback without --api-key-env (anyone who can reach the port can use it)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host is NAME (repeatable; loopback names always)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="URL",
                   help="let browser pages from URL call the API (repeatable; default: only the chat page itself)")
    p.add_argument("--max-body-mb", type=float, default=2.0, help="largest request body in MiB (default: %(default)s)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait for a batch slot; more get 429 + Retry-After (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="cancel a request unanswered after this long (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request body must arrive within this long, else 408 (default: %(default)s)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request's headers must arrive within this long, else 408 (default: %(default)s)")
    p.add_argument("--max-messages", type=int, default=1024,
                   help="longest message list one request may carry; longer ones get a 400 (default: %(default)s)")
    m = p.add_argument_group("moderation (as Koala's public demo): check the request and/or the answer")
    m.add_argument("--moderation", default=None, metavar="RM_DIR|URL",
                   help="a reward model from `protege train rm` (e.g. on HH harmless pairs: a reward below the threshold "
                        "is flagged), or an OpenAI-compatible /v1/moderations URL")
    m.add_argument("--moderation-threshold", type=float, default=None, metavar="X",
                   help="reward model: flag a reward below X (default 0); URL: flag a category score >= X "
                        "(default: the endpoint's own `flagged`)")
    m.add_argument("--moderation-stages", default="input,output", metavar="input,output",
                   help="what is checked: the last user message, the answer, or both (default: %(default)s)")
    m.add_argument("--moderation-key-env", default=None, metavar="VAR",
                   help="environment variable holding the moderation endpoint's API key")
    m.add_argument("--moderation-log", default=None, metavar="FILE",
                   help="append every decision as a JSON line (request id, stage, flagged, score, seconds)")
    m.add_argument("--moderation-log-text", action="store_true", help="also log the checked text (off by default)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from ..errors import StageError
    from ..engine import engine_for
    from ..serve.protocol import run
    from ..serve import create_app
    from ..net import is_loopback
    from ..serve.guard import Guard

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise StageError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    if not is_loopback(args.host) and not api_key:
        if not args.allow_no_key:
            raise StageError(f"--host {args.host} exposes the model to every machine that can reach this one, "
                             "and no API key is set: add --api-key-env VAR (clients send `Authorization: Bearer "
                             "$VAR`), or --allow-no-key if that is what you want")
        print(f"warning: serving on {args.host} without an API key; anyone who can reach port {args.port} "
              "can use this model", file=sys.stderr, flush=True)
    if min(args.max_body_mb, args.max_waiting, args.request_timeout, args.max_messages, args.body_timeout,
           args.header_timeout) <= 0:
        raise StageError("--max-body-mb, --max-waiting, --request-timeout, --body-timeout, --header-timeout and "
                         "--max-messages must be positive")
    guard = Guard(bind=args.host, allowed_hosts=args.allowed_host, allowed_origins=args.allowed_origin,
                  max_body_bytes=int(args.max_body_mb * (1 << 20)), body_timeout_s=args.body_timeout)
    moderation = _moderation(args)
    engine = engine_for(args.model, args.backend, args.precision, args.max_batch)
    name = args.name or os.path.basename(str(args.model).rstrip("/"))
    app = create_app(engine, name, api_key=api_key, max_batch=args.max_batch, guard=guard,
                     max_waiting=args.max_waiting, request_timeout_s=args.request_timeout,
                     max_messages=args.max_messages, model_aliases=tuple(args.served_model_name),
                     moderation=moderation)
    print(f"serving {name} on http://{args.host}:{args.port}  (chat page: /, API: /v1/chat/completions"
          f"{', API key required' if api_key else ''})", flush=True)
    run(app, args.host, args.port, header_timeout_s=args.header_timeout)
    return 0


def _moderation(args: argparse.Namespace) -> object | None:
    from ..errors import StageError
    from ..net import key_env_allowed
    from ..serve.moderation import Moderation, ModerationLog, make_moderator

    if not args.moderation:
        return None
    key = None
    if args.moderation_key_env:
        if not key_env_allowed(args.moderation_key_env):
            raise StageError(f"--moderation-key-env {args.moderation_key_env}: only *_API_KEY variables (or those "
                             "listed in PROTEGE_KEY_ENVS) may be sent to an endpoint")
        key = os.environ.get(args.moderation_key_env) or None
    stages = tuple(s.strip() for s in args.moderation_stages.split(",") if s.strip())
    moderator = make_moderator(args.moderation, args.moderation_threshold, key)
    return Moderation(moderator, ModerationLog(args.moderation_log, args.moderation_log_text), stages)
