"""`chatpager` (the chat TUI): parse the command line and run the app.

Only argparse and Textual are imported here: the UI shows at once and the model (torch,
transformers) loads on the engine thread.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from chatpager.engine_args import EngineArgs, add_engine_args
from chatpager.serve.cli import add_serve_args, serve_config
from chatpager.serve.config import DEFAULT_PORT
from chatpager.tui.config import AppConfig, default_data_dir


def parse_args(argv: list[str]) -> AppConfig:
    parser = argparse.ArgumentParser(
        prog="chatpager",
        description="Many concurrent LLM chats in one terminal, on a paged KV cache you can watch.",
    )
    parser.add_argument("--swarm", type=int, default=0, metavar="N", help="start N simulated tenants")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"where conversations are stored (default: {default_data_dir()})")
    parser.add_argument("--serve", type=int, nargs="?", const=DEFAULT_PORT, default=None,
                        metavar="PORT", help=f"also serve the OpenAI API on PORT (default "
                        f"{DEFAULT_PORT}); its tenants appear in the sidebar")
    add_serve_args(parser, port_default=None)
    add_engine_args(parser)
    args = parser.parse_args(argv)
    if args.swarm < 0:
        parser.error("--swarm must be 0 or more")
    return AppConfig(
        engine=EngineArgs.from_namespace(args),
        swarm=args.swarm,
        data_dir=args.data_dir or default_data_dir(),
        serve=None if args.serve is None else serve_config(args, args.serve),
    )


def main(argv: list[str]) -> int:
    from chatpager.tui.app import ChatpagerApp

    app = ChatpagerApp(parse_args(argv))
    app.run()
    return app.return_code or 0
