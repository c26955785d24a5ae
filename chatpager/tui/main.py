"""`chatpager` (the chat TUI): parse the command line and run the app.

Only argparse and Textual are imported here: the UI shows at once and the model (torch)
loads in the engine's own process.
"""
from __future__ import annotations

import argparse
import dataclasses
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from chatpager.engine.sampling_params import SamplingParams
from chatpager.engine_args import add_engine_args, EngineArgs
from chatpager.prompts import load_prompts, PROMPTS_DIR
from chatpager.serve.cli import add_serve_args, serve_config
from chatpager.serve.config import DEFAULT_PORT
from chatpager.tui.config import AppConfig, default_data_dir, DEFAULT_PARAMS, DEMO_NUM_BLOCKS


def parse_args(argv: list[str]) -> AppConfig:
    parser = argparse.ArgumentParser(
        prog="chatpager",
        description="Many concurrent LLM chats in one terminal, on a paged KV cache you can watch.",
    )
    parser.add_argument("--version", action="version", version=f"chatpager {_version()}")
    parser.add_argument("--swarm", type=int, default=0, metavar="N", help="start N simulated tenants")
    parser.add_argument("--demo", action="store_true",
                        help=f"start the guided tour of paging (on a {DEMO_NUM_BLOCKS}-block pool "
                             f"unless --num-blocks or --kv-cache-memory is given)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"where conversations are stored (default: {default_data_dir()})")
    parser.add_argument("--prompts-dir", type=Path, default=PROMPTS_DIR, metavar="DIR",
                        help="system prompts, one NAME.md file each (default: the shipped ones)")
    sampling = parser.add_argument_group("sampling (each session can change them with /set)")
    sampling.add_argument("--temperature", type=float, default=DEFAULT_PARAMS.temperature,
                          help=f"0 is greedy (default: {DEFAULT_PARAMS.temperature})")
    sampling.add_argument("--top-p", type=float, default=DEFAULT_PARAMS.top_p,
                          help=f"nucleus sampling mass, in (0, 1] (default: {DEFAULT_PARAMS.top_p})")
    sampling.add_argument("--max-tokens", type=int, default=DEFAULT_PARAMS.max_tokens,
                          help=f"longest reply in tokens (default: {DEFAULT_PARAMS.max_tokens})")
    parser.add_argument("--serve", type=int, nargs="?", const=DEFAULT_PORT, default=None,
                        metavar="PORT", help=f"also serve the OpenAI API on PORT (default "
                        f"{DEFAULT_PORT}); its tenants appear in the sidebar")
    add_serve_args(parser, port_default=None)
    add_engine_args(parser)
    args = parser.parse_args(argv)
    if args.swarm < 0:
        parser.error("--swarm must be 0 or more")
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                max_tokens=args.max_tokens)
    except ValueError as error:
        parser.error(str(error))
    if not args.prompts_dir.is_dir() or not load_prompts(args.prompts_dir):
        parser.error(f"--prompts-dir {args.prompts_dir}: no folder with NAME.md prompt files there")
    engine = EngineArgs.from_namespace(args)
    if args.demo and engine.num_blocks is None and engine.kv_cache_memory is None:
        engine = dataclasses.replace(engine, num_blocks=DEMO_NUM_BLOCKS)  # fills in a minute
    return AppConfig(
        engine=engine,
        swarm=args.swarm,
        demo=args.demo,
        data_dir=args.data_dir or default_data_dir(),
        serve=None if args.serve is None else serve_config(args, args.serve),
        params=params,
        prompts_dir=args.prompts_dir,
    )


def _version() -> str:
    try:
        return version("chatpager")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def main(argv: list[str]) -> int:
    from chatpager.logs import configure_file_logging, LOG_NAME
    from chatpager.tui.app import ChatpagerApp

    config = parse_args(argv)
    configure_file_logging(config.data_dir / LOG_NAME)  # the terminal belongs to the UI
    app = ChatpagerApp(config)
    app.run()
    return app.return_code or 0
