"""`lvlmlp serve`: an OpenAI-compatible chat-completions endpoint guarded by a first-token probe."""

from __future__ import annotations

import argparse
import os
from typing import Any

from lvlmlp.commands._args import (
    add_backend_argument,
    add_guard_arguments,
    add_model_arguments,
    check_backend_flags,
    guard_mode,
    token_budget,
)
from lvlmlp.errors import LvlmlpError


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as err:
        raise LvlmlpError(f"lvlmlp serve needs uvicorn ({err}); install it with `pip install 'lvlmlp[serve]'`") from None
    app = build_app(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and app.state.config.api_key is None:
        print(f"lvlmlp: warning: serving on {args.host} without --api-key: anyone who reaches it can use it")
    print(f"lvlmlp serve: {app.state.config.model_id} guarded by {args.probe} on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_app(args: argparse.Namespace) -> Any:
    """The FastAPI application the flags describe (model and probe loaded), not yet served."""
    try:
        from lvlmlp.serve import Limits, ServeConfig, create_app, load_engine
    except ImportError as err:
        raise LvlmlpError(f"lvlmlp serve needs FastAPI and prometheus-client ({err}); "
                          "install them with `pip install 'lvlmlp[serve]'`") from None
    template, answers = guard_mode(args, "serve")
    check_backend_flags(args, args.prompt_template)
    for name in ("max_batch", "max_queue", "max_tokens", "max_tokens_limit", "max_body_bytes", "max_image_bytes",
                 "max_image_pixels", "max_prompt_chars"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # --max-tokens: None is its default
            raise LvlmlpError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.port <= 65535:
        raise LvlmlpError(f"--port must be a TCP port, 1 to 65535, got {args.port}")
    if args.batch_wait_ms < 0:
        raise LvlmlpError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    if args.max_tokens is not None and args.max_tokens > args.max_tokens_limit:
        raise LvlmlpError(f"--max-tokens {args.max_tokens} is above --max-tokens-limit {args.max_tokens_limit}")
    engine = load_engine(args.model, args.probe, template=template, answers=answers,
                         threshold=args.threshold, device=args.device, dtype=args.dtype,
                         prompt_template=args.prompt_template, raw_prompt=args.raw_prompt,
                         system_prompt=args.system_prompt, allow_other_model=args.allow_other_model,
                         trust_remote_code=args.trust_remote_code, backend=args.backend)
    # As `lvlmlp generate`: requests that do not say would otherwise stop inside the forced text.
    max_tokens = token_budget(args, engine.guard, "--max-tokens")
    if max_tokens > args.max_tokens_limit:
        raise LvlmlpError(f"the forced text is {max_tokens} tokens long, above --max-tokens-limit "
                          f"{args.max_tokens_limit}: give --max-tokens-limit {max_tokens} or more")
    model = str(args.model).rstrip("/")
    config = ServeConfig(
        model_id=args.served_model_name or os.path.basename(model) or model,
        aliases={model, str(args.model), os.path.abspath(model)},
        limits=Limits(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                      max_prompt_chars=args.max_prompt_chars, allow_local_images=args.allow_local_images),
        max_body_bytes=args.max_body_bytes, default_max_tokens=max_tokens,
        max_tokens_limit=args.max_tokens_limit, api_key=args.api_key or os.environ.get("LVLMLP_API_KEY") or None,
        max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
    )
    return create_app(engine, config)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible chat endpoint guarded by a first-token probe")
    add_model_arguments(p)  # --prompt-template / --raw-prompt: as the probe's training rows were prompted
    add_backend_argument(p)  # its `model` module is hooked to read the raw logits (docs/backends.md)
    add_guard_arguments(p, "requests")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: the model folder's name); the path given works too")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LVLMLP_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long the first waiting request waits for others to join its batch")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests at most; more get HTTP 503")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="max_tokens of requests that do not say (default 64, or the forced text's length when longer)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="the largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20, help="larger request bodies get HTTP 413")
    p.add_argument("--max-image-bytes", type=int, default=10 << 20, help="larger images get HTTP 413")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="larger images get HTTP 413")
    p.add_argument("--max-prompt-chars", type=int, default=8000, help="longer questions get HTTP 400")
    p.add_argument("--allow-local-images", action="store_true",
                   help="accept image_url paths (or file:// URLs) on this machine; remote URLs are never fetched")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=run)
