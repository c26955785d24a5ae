"""Decode speed with and without n-gram speculative decoding, on an input-grounded chat task
and on free chat, single stream and N concurrent sessions.

Input-grounded: "fix the typos in this text" over a paragraph with a few typos — the reply
mostly repeats the input, so prompt lookup proposes well. Free chat: open questions, where
proposals are rare and a sequence whose proposals fail stops proposing. Greedy decoding, so
the two settings must produce identical text (checked, mismatches reported).

Each setting gets a freshly loaded engine and runs the same sequence: one warm-up request,
then single stream (the task's prompts one after another), then N sessions at once. tok/s =
generated tokens / wall time of that phase (prefill included, as a user waits for it).

    .venv/bin/python benchmarks/speculative.py                         # default model, 16 sessions
    .venv/bin/python benchmarks/speculative.py --max-tokens 64 --sessions 8 --num-speculative-tokens 6
    .venv/bin/python benchmarks/speculative.py --max-tokens 8 --sessions 2 --single 1   # smoke run

Engine options (--quantization, --kv-cache-dtype, ...) are those of `chatpager`; --speculative
itself is ignored: both settings always run.
"""
from __future__ import annotations

import argparse
import gc
import time

from chatpager.omp_policy import choose_wait_policy  # noqa: E402

choose_wait_policy()  # the OpenMP wait policy chat and serve get; before torch loads

from chatpager import LLM, SamplingParams  # noqa: E402
from chatpager.engine_args import EngineArgs, add_engine_args  # noqa: E402

PARAGRAPHS = [
    "Teh weather was beautifull this morning, so we decided to walk to the old libary near the river.",
    "Our team will recieve the new equipment next week and we should be ready to begin testing imediately.",
    "She allways forgets her umbrella when it rains, wich is suprisingly often in this part of the country.",
    "The comittee agreed that the budjet for the festival should be increased by ten percent this year.",
    "Please make sure you have acess to the shared folder before the meeting on thursday afternoon.",
    "I definately think the new restaraunt on the corner serves the best noodles in the neighbourhood.",
    "The scientist explaned that the experiment had to be repeated becuase the samples were contaminated.",
    "He was so tierd after the long journey that he fell asleep on the couch before diner was ready.",
    "Remember to seperate the recycling from the regular garbage, otherwise the truck will not colect it.",
    "The museum's new exibition features paintings from the ninteenth century and some rare sculptures.",
    "Our neighbours are planing a garden party and they have invited everyone on the street to atend.",
    "The train was delayed by fourty minutes because of a signal failure just outside the main staton.",
    "It is importent to drink enough water during the summer, especialy when you exercise outdoors.",
    "The childern built an enormous sandcastle on the beach and decorated it with shells and seaweed.",
    "After months of practise, the orchestra finaly performed the symphony without a single mistake.",
    "The software update fixes several bugs and improves the perfomance of the aplication on older phones.",
]
QUESTIONS = [
    "What are some good habits for staying healthy?", "Tell me a short story about a brave mouse.",
    "Why do leaves change colour in autumn?", "Give me ideas for a rainy weekend.",
    "How does a bicycle stay upright?", "What should I pack for a camping trip?",
    "Explain what a rainbow is to a child.", "What makes a good friend?",
    "Describe your ideal holiday.", "How do bees make honey?", "What is the best way to learn a language?",
    "Write a short poem about the sea.", "Why is exercise good for the brain?",
    "How can I save money on groceries?", "What are the planets of the solar system?",
    "Suggest a name for a new bakery and explain it.",
]


def chats(task: str, n: int) -> list[list[dict]]:
    if task == "grounded":
        return [[{"role": "user", "content": f"Fix the typos in this text and write it out in full: "
                  f"{PARAGRAPHS[i % len(PARAGRAPHS)]}"}] for i in range(n)]
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams, together: bool) -> tuple[float, list]:
    start = time.perf_counter()
    if together:
        outs = llm.generate(prompts, params)
    else:
        outs = [llm.generate(p, params)[0] for p in prompts]
    return time.perf_counter() - start, [tuple(o.token_ids) for o in outs]


def run_setting(engine_args: EngineArgs, spec: bool, args) -> dict:
    kwargs = engine_args.llm_kwargs()
    kwargs.update(speculative="ngram" if spec else None, num_speculative_tokens=args.num_speculative_tokens)
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate(llm.encode_chat(chats("free", 1)[0]), SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    results = {}
    for task in ("grounded", "free"):
        single = [llm.encode_chat(c) for c in chats(task, args.single)]
        many = [llm.encode_chat(c) for c in chats(task, args.sessions)]
        before = llm.stats()
        t1, out1 = timed(llm, single, params, together=False)
        tn, outn = timed(llm, many, params, together=True)
        after = llm.stats()
        proposed = after["spec_proposed_tokens"] - before["spec_proposed_tokens"]
        accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
        results[task] = dict(single_tps=sum(map(len, out1)) / t1, sessions_tps=sum(map(len, outn)) / tn,
                             outputs=out1 + outn, acceptance=accepted / proposed if proposed else 0.0)
    del llm
    gc.collect()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--single", type=int, default=4, help="prompts run one after another (single stream)")
    args = ap.parse_args()
    engine_args = EngineArgs.from_namespace(args)
    off = run_setting(engine_args, False, args)
    on = run_setting(engine_args, True, args)
    print(f"max_tokens {args.max_tokens}, {args.sessions} sessions, num_speculative_tokens "
          f"{args.num_speculative_tokens}, greedy")
    print(f"{'task':<9} {'phase':<12} {'off tok/s':>9} {'ngram tok/s':>11} {'speedup':>7} {'accept':>6} {'same':>5}")
    for task in ("grounded", "free"):
        same = sum(a == b for a, b in zip(off[task]["outputs"], on[task]["outputs"]))
        total = len(off[task]["outputs"])
        for phase, key in (("single", "single_tps"), (f"{args.sessions} sessions", "sessions_tps")):
            a, b = off[task][key], on[task][key]
            print(f"{task:<9} {phase:<12} {a:>9.1f} {b:>11.1f} {b / a:>6.2f}x {on[task]['acceptance']:>6.2f} "
                  f"{same:>2}/{total}")


if __name__ == "__main__":
    main()
