"""KV blocks a long chat holds on a sliding-window model: a window's worth, not its history.

A random Mistral-layout model with `sliding_window` W runs one chat of several turns on a
pool smaller than the chat: each turn's prompt is the whole history so far (the last reply
included) plus a new user message, and the reply is greedy. Per turn: the history length,
the prompt tokens served by the prefix cache (a windowed hit needs only the blocks inside the
window), the most blocks the sequence held in a decode step and in a prefill step, the bounds
cdiv(W, bs) + 1 and cdiv(W - 1 + chunk, bs) + 1 (block_manager.py), and what full attention
would hold at the end of the turn. The pool must be free again after every turn.

    .venv/bin/python benchmarks/window_blocks.py                       # W=256, bs=16, 64 blocks, 6 turns
    .venv/bin/python benchmarks/window_blocks.py --window 32 --block-size 8 --num-blocks 16
"""
from __future__ import annotations

import argparse
import random
import tempfile

from chatpager import LLM, SamplingParams
from chatpager.engine.core.block_manager import cdiv
from chatpager.engine.model.tiny_model import make_tiny_model


def run_turn(llm: LLM, prompt: list[int], max_tokens: int) -> dict:
    engine = llm.engine
    rid = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    peaks, reply, cached = {"decode": 0, "prefill": 0}, [], 0
    seq = engine.seqs[rid]
    while engine.has_unfinished():
        before = seq.num_computed_tokens
        for out in engine.step():
            reply.extend(out.new_token_ids)
            cached = out.num_cached_tokens
        computed = seq.num_computed_tokens - before
        if computed:  # what it held during that step (released blocks come back at the next one)
            kind = "decode" if computed == 1 else "prefill"
            peaks[kind] = max(peaks[kind], len(seq.blocks) - seq.num_null_blocks)
    assert engine.pool.num_free == engine.pool.num_blocks, "blocks leaked"
    return {"reply": reply, "cached": cached, **peaks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=128, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--user-tokens", type=int, default=48)
    ap.add_argument("--reply-tokens", type=int, default=256)
    args = ap.parse_args()
    w, bs = args.window, args.block_size
    model = make_tiny_model(tempfile.mkdtemp(prefix="window-blocks-"), arch="mistral", sliding_window=w,
                            max_position_embeddings=args.turns * (args.user_tokens + args.reply_tokens) + 64)
    llm = LLM(str(model), block_size=bs, num_blocks=args.num_blocks, max_num_batched_tokens=args.chunk)
    rng = random.Random(0)
    print(f"window {w}, block size {bs}, pool {args.num_blocks} blocks ({args.num_blocks * bs} slots), "
          f"chunk {args.chunk}; bounds: decode {cdiv(w, bs) + 1}, prefill {cdiv(w - 1 + args.chunk, bs) + 1} blocks")
    print(f"{'turn':>4} {'history':>8} {'prompt':>7} {'hit':>6} {'held_decode':>12} {'held_prefill':>13} "
          f"{'full_attention':>15}")
    history: list[int] = []
    for turn in range(1, args.turns + 1):
        prompt = history + [rng.randrange(3, 250) for _ in range(args.user_tokens)]
        r = run_turn(llm, prompt, args.reply_tokens)
        history = prompt + r["reply"]
        print(f"{turn:>4} {len(history):>8} {len(prompt):>7} {r['cached']:>6} {r['decode']:>12} "
              f"{r['prefill']:>13} {cdiv(len(history), bs):>15}")
    stats = llm.stats()
    print(f"released behind the window: {stats['window_released_blocks']} blocks; "
          f"evictions {stats['evictions']}; prefix hit rate {stats['prefix_hit_rate']:.2f}")


if __name__ == "__main__":
    main()
