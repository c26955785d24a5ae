"""One chat reply streamed in the TUI, against the engine alone: what the app's own work costs.

Each run is a fresh process on the default model: a greedy reply of `--max-tokens` tokens to
one chat message (the "assistant" system prompt), timed from the send to the last token.
  alone    `LLM.generate` in a plain process: the peer, with no UI at all
  process  the app (headless, Textual's `run_test`, 180x45), its engine in a process of its
           own: what `chatpager` does
  thread   the same app with the engine on a thread of the app's process (what chatpager did
           before the split)
The app types the message into its input and presses Enter; the reply streams into the chat
pane with the block map, stats and sidebar refreshing as usual. Greedy replies must be equal
in every mode (checked). Modes alternate run by run, so a drift of the machine hits all alike.

    .venv/bin/python benchmarks/tui_stream.py                   # 3 runs of each mode
    .venv/bin/python benchmarks/tui_stream.py --runs 5 --max-tokens 400
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("alone", "process", "thread")
MESSAGE = "Write a long story about a robot who learns to paint."


def run_alone(max_tokens: int) -> dict:
    from chatpager import LLM, SamplingParams
    from chatpager.tui.prompts import load_prompts

    llm = LLM()
    messages = [{"role": "system", "content": load_prompts()["assistant"]},
                {"role": "user", "content": MESSAGE}]
    start = time.perf_counter()
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=max_tokens))[0]
    return {"seconds": time.perf_counter() - start, "tokens": len(out.token_ids), "text": out.text}


async def run_app(max_tokens: int, engine_process: bool) -> dict:
    from chatpager import SamplingParams
    from chatpager.engine_args import EngineArgs
    from chatpager.tui.app import ChatpagerApp
    from chatpager.tui.config import AppConfig
    from chatpager.tui.widgets.prompt_input import PromptInput

    with tempfile.TemporaryDirectory() as data_dir:
        config = AppConfig(engine=EngineArgs(), data_dir=Path(data_dir), engine_process=engine_process,
                           params=SamplingParams(temperature=0.0, max_tokens=max_tokens))
        app = ChatpagerApp(config)
        async with app.run_test(size=(180, 45)) as pilot:
            while not app.engine.ready:
                await pilot.pause(0.1)
            await pilot.pause(1.0)  # the first snapshot drawn, the app settled
            session = app.current
            app.main.query_one(PromptInput).text = MESSAGE
            start = time.perf_counter()
            await pilot.press("enter")
            while not session.messages or session.busy or session.messages[-1].role != "assistant":
                await pilot.pause(0.01)
            seconds = time.perf_counter() - start
            text = session.messages[-1].content
            threads = app.engine.model_info["threads"]
    return {"seconds": seconds, "text": text, "threads": threads}


def one(mode: str, max_tokens: int) -> dict:
    if mode == "alone":
        return run_alone(max_tokens)
    return asyncio.run(run_app(max_tokens, engine_process=mode == "process"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child process's single run
    p.add_argument("--json", type=Path, default=None, help="write every run here")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.max_tokens)))
        return
    from chatpager.omp_policy import choose_wait_policy

    choose_wait_policy()
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for i in range(args.runs):
        for mode in MODES:
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--max-tokens", str(args.max_tokens)],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1]) | {"load": load}
            runs[mode].append(result)
            print(f"run {i + 1} {mode:8s} {result['seconds']:6.2f} s  (load {load:.2f})", flush=True)
    tokens = runs["alone"][0]["tokens"]
    texts = {r["text"] for rs in runs.values() for r in rs}
    print(f"\n{tokens} greedy tokens; replies equal in every run and mode: {len(texts) == 1}")
    alone = statistics.median(r["seconds"] for r in runs["alone"])
    for mode in MODES:
        median = statistics.median(r["seconds"] for r in runs[mode])
        threads = runs[mode][0].get("threads")
        extra = "" if threads is None else f"  engine threads {threads}"
        print(f"{mode:8s} median {median:5.2f} s  {tokens / median:6.1f} tok/s  {median / alone:4.2f}x alone's time{extra}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"max_tokens": args.max_tokens, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
