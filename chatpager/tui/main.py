"""`chatpager` (the chat TUI): parse the command line and run the app.

Only argparse and Textual are imported here: the UI shows at once and the model (torch,
transformers) loads on the engine thread.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from chatpager.tui.config import AppConfig, default_data_dir


def parse_args(argv: list[str]) -> AppConfig:
    parser = argparse.ArgumentParser(
        prog="chatpager",
        description="Many concurrent LLM chats in one terminal, on a paged KV cache you can watch.",
    )
    parser.add_argument("--model", help="Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--num-blocks", type=int, help="KV blocks in the pool (default: sized from memory)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    parser.add_argument("--swarm", type=int, default=0, metavar="N", help="start N simulated tenants")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"where conversations are stored (default: {default_data_dir()})")
    parser.add_argument("--attention", choices=("auto", "torch", "triton"), default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    args = parser.parse_args(argv)
    if args.num_blocks is not None and args.num_blocks < 1:
        parser.error("--num-blocks must be at least 1")
    if args.block_size < 1:
        parser.error("--block-size must be at least 1")
    if args.swarm < 0:
        parser.error("--swarm must be 0 or more")
    return AppConfig(
        model=args.model,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        attention=args.attention,
        device=args.device,
        dtype=args.dtype,
        swarm=args.swarm,
        data_dir=args.data_dir or default_data_dir(),
    )


def main(argv: list[str]) -> int:
    from chatpager.tui.app import ChatpagerApp

    app = ChatpagerApp(parse_args(argv))
    app.run()
    return app.return_code or 0
