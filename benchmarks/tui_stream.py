"""Chat replies streamed in the TUI, against the engine alone: what the app's own work costs.

Each run is a fresh process on the default model: greedy replies of `--max-tokens` tokens to
one chat message (the "assistant" system prompt) in each of `--sessions` sessions at once,
timed from the send to the last token.
  alone    `LLM.generate` in a plain process: the peer, with no UI at all
  process  the app (headless, Textual's `run_test`, 180x45), its engine in a process of its
           own: what `chatpager` does
  thread   the same app with the engine on a thread of the app's process (what chatpager did
           before the split)
The app types the message into its input and presses Enter (other sessions are sent the same
message by the app's turn control at that moment); the reply on screen streams into the chat
pane with the block map, stats and sidebar refreshing as usual. Greedy replies must be equal in
every mode (checked; with several sessions, reported). Modes alternate run by run, so a drift
of the machine hits all alike.

    .venv/bin/python benchmarks/tui_stream.py                   # 3 runs of each mode, one session
    .venv/bin/python benchmarks/tui_stream.py --runs 5 --max-tokens 400
    .venv/bin/python benchmarks/tui_stream.py --sessions 8 --max-tokens 128
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


def run_alone(max_tokens: int, sessions: int) -> dict:
    from chatpager import LLM, SamplingParams
    from chatpager.prompts import load_prompts

    llm = LLM()
    messages = [{"role": "system", "content": load_prompts()["assistant"]},
                {"role": "user", "content": MESSAGE}]
    prompts = [llm.encode_chat(messages)] * sessions
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return {"seconds": time.perf_counter() - start, "tokens": sum(len(o.token_ids) for o in outs),
            "texts": [o.text for o in outs]}


async def run_app(max_tokens: int, sessions: int, engine_process: bool) -> dict:
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
            others = [app.sessions.create(app.default_prompt) for _ in range(sessions - 1)]
            chats = [app.current, *others]
            app.main.query_one(PromptInput).text = MESSAGE
            start = time.perf_counter()
            for session in others:
                app.turns.send(session, MESSAGE)
            await pilot.press("enter")
            while any(not s.messages or s.busy or s.messages[-1].role != "assistant" for s in chats):
                await pilot.pause(0.01)
            seconds = time.perf_counter() - start
    return {"seconds": seconds, "texts": [s.messages[-1].content for s in chats]}


def one(mode: str, max_tokens: int, sessions: int) -> dict:
    if mode == "alone":
        return run_alone(max_tokens, sessions)
    return asyncio.run(run_app(max_tokens, sessions, engine_process=mode == "process"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--sessions", type=int, default=1, help="sessions sent the message at once")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child process's single run
    p.add_argument("--json", type=Path, default=None, help="write every run here")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.max_tokens, args.sessions)))
        return
    from chatpager.omp_policy import choose_wait_policy

    choose_wait_policy()
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for i in range(args.runs):
        for mode in MODES:
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--max-tokens", str(args.max_tokens),
                                  "--sessions", str(args.sessions)], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1]) | {"load": load}
            runs[mode].append(result)
            print(f"run {i + 1} {mode:8s} {result['seconds']:6.2f} s  (load {load:.2f})", flush=True)
    tokens = runs["alone"][0]["tokens"]
    texts = {tuple(r["texts"]) for rs in runs.values() for r in rs}
    print(f"\n{tokens} greedy tokens in {args.sessions} session(s); replies equal in every run and mode: "
          f"{len(texts) == 1}")
    alone = statistics.median(r["seconds"] for r in runs["alone"])
    for mode in MODES:
        median = statistics.median(r["seconds"] for r in runs[mode])
        print(f"{mode:8s} median {median:5.2f} s  {tokens / median:6.1f} tok/s  {median / alone:4.2f}x alone's time")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"max_tokens": args.max_tokens, "sessions": args.sessions,
                                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": runs},
                                        indent=1))


if __name__ == "__main__":
    main()
