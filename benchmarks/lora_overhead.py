"""What the multi-LoRA delta costs a decode step of the default model: `--seqs` sequences
decoding with `--loras` random rank-`--rank` adapters (peft, every projection) loaded, either
every sequence under one of them (round robin: each step mixes them all) or only the first.

    .venv/bin/python benchmarks/lora_overhead.py --seqs 16 --context 200 --loras 4 --rank 16

Steps with and without the delta alternate on the same batch (the runner's adapters switched
off every other step), so a busy machine slows both alike; the medians and their ratio print.
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from chatpager.omp_policy import choose_wait_policy  # noqa: E402

choose_wait_policy()  # the OpenMP wait policy chat and serve get; before torch loads
import torch  # noqa: E402

from chatpager import LLM, SamplingParams  # noqa: E402
from chatpager.engine.model.loader import resolve_model_dir  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: str, count: int, rank: int, root: Path) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i in range(count):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.01)
        model.save_pretrained(root / f"lora{i}")
        paths[f"lora{i}"] = str(root / f"lora{i}")
    return paths


def step_ms(llm: LLM, loras: list[str | None], context: int, steps: int) -> tuple[float, float]:
    """Median decode step (ms) of these requests without and with their adapters' delta."""
    eng, rng = llm.engine, random.Random(0)
    for lora in loras:
        prompt = [rng.randrange(100, 40000) for _ in range(context)]
        eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=2 * steps + 2, ignore_eos=True, lora=lora))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.seqs.values()):
        eng.step()
    eng.step()
    weights, times = eng.runner.lora, {False: [], True: []}
    for i in range(2 * steps):
        eng.runner.lora = weights if i % 2 else None
        start = time.perf_counter()
        eng.step()
        times[bool(i % 2)].append(time.perf_counter() - start)
    eng.runner.lora = weights
    while eng.has_unfinished():
        eng.step()
    return 1000 * statistics.median(times[False]), 1000 * statistics.median(times[True])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--loras", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--quantization", default="none", help="LLM(quantization=...) (%(default)s)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(str(resolve_model_dir(None)), args.loras, args.rank, Path(tmp))
        llm = LLM(max_model_len=1024, quantization=args.quantization, lora_adapters=adapters,
                  max_loras=args.loras)
    names = list(adapters)
    cases = {f"all {args.seqs} on one of {args.loras}": [names[i % len(names)] for i in range(args.seqs)],
             f"1 of {args.seqs} on one": [names[0]] + [None] * (args.seqs - 1)}
    print(f"decode step, {args.seqs} seqs x {args.context} ctx, rank {args.rank}, quantization "
          f"{args.quantization}, torch threads {torch.get_num_threads()}:")
    for label, loras in cases.items():
        base, with_delta = step_ms(llm, loras, args.context, args.steps)
        print(f"  {label}: {base:.1f} ms without the delta, {with_delta:.1f} ms with ({with_delta / base - 1:+.0%})")


if __name__ == "__main__":
    main()
