"""`miaotui serve`: the OpenAI-compatible HTTP server."""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import sys
import threading
import time
from typing import Iterator

from miaotui.config import MiaotuiError


def served_name(model_path: str) -> str:
    """The default model name: the checkpoint's file or directory name, without .gguf."""
    name = os.path.basename(os.path.normpath(model_path))
    return name[:-5] if name.endswith(".gguf") else name


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_origins(value: str | None) -> list[str]:
    """--allowed-origins: a comma-separated list of web origins (scheme://host[:port]), or '*'."""
    origins = [o.strip() for o in (value or "").split(",") if o.strip()]
    if origins == ["*"]:
        return origins
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
            raise MiaotuiError(f"--allowed-origins: {origin!r} is not an origin like "
                               "http://localhost:3000 (or give '*' alone)")
    return origins


@contextlib.contextmanager
def serve_in_thread(app, timeout: float = 30) -> Iterator[str]:
    """Run the ASGI `app` with uvicorn on a free loopback port in a background thread and
    yield its base URL; stop it on exit. For tests and measurement scripts."""
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise MiaotuiError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)


def cmd_serve(args) -> None:
    import uvicorn

    from miaotui.cli import load_llm
    from miaotui.serve.api import create_app
    if not 0 < args.port < 65536:
        raise MiaotuiError(f"--port {args.port} is not a valid port")
    api_key = args.api_key or os.environ.get("MIAOTUI_API_KEY")
    origins = parse_origins(args.allowed_origins)
    if not is_loopback(args.host) and not api_key:
        print(f"[miaotui] warning: serving on {args.host} without --api-key; anyone who can "
              "reach this address can use the model", file=sys.stderr)
    if args.data_parallel_size > 1:
        from miaotui.cli import engine_kwargs
        from miaotui.distributed.dp import DPEngine
        from miaotui.engine.llm_engine import EngineConfig
        engine = DPEngine(EngineConfig(model=args.model, **engine_kwargs(args)), args.data_parallel_size)
        print(f"[miaotui] {args.data_parallel_size} data-parallel replicas of {engine.model_path}", file=sys.stderr)
    else:
        engine = load_llm(args).engine
    name = args.served_model_name or served_name(engine.model_path)
    app = create_app(engine, name, api_key=api_key, max_waiting=args.max_waiting,
                     host=args.host, allowed_origins=origins)
    print(f"[miaotui] serving {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def add_parser(subparsers) -> None:
    from miaotui.cli import add_model_args, at_least
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $MIAOTUI_API_KEY, else none)")
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients must send (default: the checkpoint's name)")
    g.add_argument("--max-waiting", type=int, default=128,
                   help="waiting requests beyond which new ones get 503 + Retry-After")
    g.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                   help="web origins allowed to call the server from a browser (CORS), comma-"
                        "separated, e.g. http://localhost:3000; '*' for any (default: none)")
    g.add_argument("--log-level", default="warning", help="uvicorn log level")
    g.add_argument("--data-parallel-size", "--dp", type=at_least(1), default=1, metavar="N",
                   help="N engine replicas (processes, cores/N threads each) behind this server, "
                        "requests routed to the least loaded or to the one caching their prefix")
    p.set_defaults(func=cmd_serve, max_decode_delay=2.5)   # streams keep flowing under long prompts
