"""KV blocks a beam search holds, against `beam_width` contiguous caches of the same beams.

One prompt, beam search of width k: after every step, blocks held by the pool (refcount > 0)
vs what `k` separate contiguous caches would need for the same beams (each beam's whole
context, prompt included, in blocks of the same size). Beams share the prompt's blocks and
the common part of their histories through fork; a dropped beam frees its blocks; only a
shared, partly filled last block is copied when written (copy-on-write copies counted).

    .venv/bin/python benchmarks/beam_blocks.py                    # tiny random model, k = 2, 4, 8
    .venv/bin/python benchmarks/beam_blocks.py --model default --prompt-tokens 300 --max-tokens 32
"""
from __future__ import annotations

import argparse
import random
import tempfile

from chatpager import LLM
from chatpager.engine.sampling_params import BeamSearchParams


def measure(llm: LLM, prompt: list[int], k: int, max_tokens: int) -> dict:
    engine, bs = llm.engine, llm.engine.config.block_size
    cow_before = engine.block_manager.cow_copies
    rid = engine.add_beam_search(prompt, BeamSearchParams(beam_width=k, max_tokens=max_tokens, ignore_eos=True))
    peak_held = peak_contig = 0
    ratios = []
    while engine.has_unfinished():
        engine.step()
        beams = [s for s in engine.seqs.values() if s.request_id.split(".")[0] == rid]
        if len(beams) < k:
            continue
        held = engine.pool.num_blocks - engine.pool.num_free
        contiguous = sum(-(-s.num_tokens // bs) for s in beams)
        peak_held, peak_contig = max(peak_held, held), max(peak_contig, contiguous)
        ratios.append(held / contiguous)
    engine.beams.result(rid)
    return {"k": k, "prompt_blocks": -(-len(prompt) // bs), "peak_held": peak_held,
            "peak_contiguous": peak_contig, "mean_ratio": sum(ratios) / max(1, len(ratios)),
            "cow_copies": engine.block_manager.cow_copies - cow_before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (a random model, default), default, or a model path")
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    if args.model == "tiny":
        from chatpager.engine.model.tiny_model import make_tiny_model
        model = str(make_tiny_model(tempfile.mkdtemp(prefix="beam-blocks-")))
    else:
        model = None if args.model == "default" else args.model
    llm = LLM(model=model, block_size=args.block_size, num_blocks=4096, quantization="none")
    vocab = llm.model.config.vocab_size
    rng = random.Random(0)
    prompt = [rng.randrange(min(vocab, 250)) for _ in range(args.prompt_tokens)]
    print(f"prompt {len(prompt)} tokens, {args.max_tokens} new, block size {args.block_size}")
    print(f"{'k':>3} {'prompt_blk':>10} {'peak_held':>9} {'k x contiguous':>14} {'held/contig':>11} {'cow_copies':>10}")
    for k in args.widths:
        r = measure(llm, prompt, k, args.max_tokens)
        print(f"{r['k']:>3} {r['prompt_blocks']:>10} {r['peak_held']:>9} {r['peak_contiguous']:>14} "
              f"{r['mean_ratio']:>11.2f} {r['cow_copies']:>10}")


if __name__ == "__main__":
    main()
