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
import threading
from pathlib import Path

from chatpager.engine_args import EngineArgs, add_engine_args
from chatpager.errors import ChatpagerError
from chatpager.serve.config import (DEFAULT_HOST, DEFAULT_PORT, SINGLE_KEY_TENANT, ServeConfig,
                                    check_bind, load_api_keys)


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


def main(argv: list[str]) -> int:
    config, engine_args = parse_args(argv)
    from chatpager.engine.loop import EngineLoop
    from chatpager.logs import configure_file_logging, default_log_path
    from chatpager.serve.server import make_server

    loaded = threading.Event()
    failure: list[BaseException] = []

    def load(progress):
        from chatpager import LLM

        def say(stage: str, fraction: float | None) -> None:
            percent = "" if fraction is None else f" {100 * fraction:.0f}%"
            print(f"chatpager serve: {stage}{percent}", file=sys.stderr, flush=True)

        try:
            return LLM(**engine_args.llm_kwargs(), progress=say)
        except BaseException as exc:
            failure.append(exc)
            raise
        finally:
            loaded.set()

    log_path = default_log_path()
    configure_file_logging(log_path)
    print(f"chatpager serve: logging to {log_path}", file=sys.stderr, flush=True)
    engine = EngineLoop(load)
    engine.start()
    loaded.wait()
    if failure:
        raise ChatpagerError(f"the model failed to load: {failure[0]}")
    server = make_server(engine, config)
    print(f"chatpager serve: {engine.model_info['name']} on http://{config.host}:{config.port}/v1",
          file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        engine.close(timeout=2.0)
    return 0
