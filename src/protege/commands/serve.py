"""`protege serve`: OpenAI-compatible API + chat page for a model."""

from __future__ import annotations

import argparse
import os
from typing import Any

ORDER = 95


def register(sub: Any) -> None:
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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: %(default)s)")
    p.add_argument("--name", default=None, help="model name reported by /v1/models (default: MODEL)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..errors import StageError
    from ..engine import Engine
    from ..models import load
    from ..serve import create_app

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise StageError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    model, tok = load(args.model, dtype=args.dtype)
    engine = Engine(model, tok, max_batch_size=args.max_batch)
    name = args.name or os.path.basename(str(args.model).rstrip("/"))
    app = create_app(engine, name, api_key=api_key, max_batch=args.max_batch)
    print(f"serving {name} on http://{args.host}:{args.port}  (chat page: /, API: /v1/chat/completions"
          f"{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
