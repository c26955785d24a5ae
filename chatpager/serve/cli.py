"""`chatpager serve`: the OpenAI-compatible server on the command line.

    chatpager serve                                   # 127.0.0.1:8000, the default model
    chatpager serve --port 9000 --model DIR --num-blocks 4096
    chatpager serve --host 0.0.0.0 --api-keys keys.txt --isolate-tenants

The model loads before the server listens, so a bad model or option ends the command with
one line instead of a server that answers 503.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from chatpager.engine.loop.protocol import ProgressFn
from chatpager.engine_args import add_engine_args, EngineArgs
from chatpager.serve.config import check_bind, DEFAULT_HOST, DEFAULT_PORT, load_api_keys, ServeConfig, SINGLE_KEY_TENANT

if TYPE_CHECKING:
    from chatpager.engine.llm import LLM


def add_serve_args(parser: argparse.ArgumentParser, port_default: int | None = DEFAULT_PORT) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)")
    if port_default is not None:
        g.add_argument("--port", type=int, default=port_default, help="(default: %(default)s)")
    keys = g.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (tenant: default)")
    keys.add_argument("--api-keys", type=Path, metavar="FILE", help="'tenant: key' lines, one per tenant")
    g.add_argument("--isolate-tenants", action="store_true",
                   help="salt each tenant's prefix-cache entries with its name: no cross-tenant hits")
    g.add_argument("--max-waiting", type=int, default=None, metavar="N",
                   help="answer 429 when N requests already wait for the engine (default: no bound)")
    g.add_argument("--served-model-name", default=None, help="the model's name in the API "
                   "(default: the model directory's name)")


def serve_config(args: argparse.Namespace, port: int) -> ServeConfig:
    if args.api_keys is not None:
        keys = load_api_keys(args.api_keys)
    else:
        keys = {args.api_key: SINGLE_KEY_TENANT} if args.api_key else {}
    config = ServeConfig(host=args.host, port=port, api_keys=keys,
                         isolate_tenants=args.isolate_tenants, max_waiting=args.max_waiting,
                         served_model_name=args.served_model_name)
    check_bind(config)
    return config


def parse_args(argv: list[str]) -> tuple[ServeConfig, EngineArgs]:
    parser = argparse.ArgumentParser(prog="chatpager serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(parser)
    add_engine_args(parser)
    args = parser.parse_args(argv)
    return serve_config(args, args.port), EngineArgs.from_namespace(args)


def load_telling(kwargs: dict, progress: ProgressFn) -> LLM:
    """`load_llm`, each stage also told on stderr (the core's process writes to the terminal)."""
    from chatpager.engine.loop.core import load_llm

    def say(stage: str, fraction: float | None) -> None:
        percent = "" if fraction is None else f" {100 * fraction:.0f}%"
        print(f"chatpager serve: {stage}{percent}", file=sys.stderr, flush=True)
        progress(stage, fraction)

    return load_llm(kwargs, say)


def main(argv: list[str]) -> int:
    config, engine_args = parse_args(argv)
    from chatpager.engine.loop.client import EngineLoop
    from chatpager.logs import configure_file_logging, default_log_path
    from chatpager.serve.server import make_server

    log_path = default_log_path()
    configure_file_logging(log_path)
    print(f"chatpager serve: logging to {log_path}", file=sys.stderr, flush=True)
    # The engine in a process of its own: the server's request handling never waits on its GIL.
    engine = EngineLoop(partial(load_telling, engine_args.llm_kwargs()), process=True)
    engine.start()
    try:
        engine.wait_loaded()
        server = make_server(engine, config)
        print(f"chatpager serve: {engine.model_info['name']} on http://{config.host}:{config.port}/v1",
              file=sys.stderr, flush=True)
        server.run()
    finally:
        engine.close(timeout=2.0)
    return 0
