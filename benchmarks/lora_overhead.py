"""What multi-LoRA costs a decode step: the default model without adapters, with `--loras`
random rank-`--rank` adapters loaded but unused, and with every sequence under one of them
(round robin, so each step mixes them all).

    .venv/bin/python benchmarks/lora_overhead.py --seqs 16 --context 200 --loras 4 --rank 16

The adapters are made with peft (random lora_B, every projection targeted) in a temporary
directory; each case prefills its sequences, then times `--steps` decode steps (median wall).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `chatpager bench` does; before torch loads
import torch  # noqa: E402

from chatpager import LLM, SamplingParams  # noqa: E402

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


def step_ms(llm: LLM, loras: list[str | None], context: int, steps: int) -> float:
    eng, rng = llm.engine, random.Random(0)
    for lora in loras:
        prompt = [rng.randrange(100, 40000) for _ in range(context)]
        eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True, lora=lora))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.seqs.values()):
        eng.step()
    eng.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - start)
    while eng.has_unfinished():
        eng.step()
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--loras", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--quantization", default="none", help="LLM(quantization=...) (%(default)s)")
    args = p.parse_args()
    kwargs = dict(max_model_len=1024, quantization=args.quantization)
    base = LLM(**kwargs)
    plain = step_ms(base, [None] * args.seqs, args.context, args.steps)
    model_dir = base.model_info["path"]
    del base
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(model_dir, args.loras, args.rank, Path(tmp))
        llm = LLM(lora_adapters=adapters, max_loras=args.loras, **kwargs)
        unused = step_ms(llm, [None] * args.seqs, args.context, args.steps)
        names = list(adapters)
        mixed = step_ms(llm, [names[i % len(names)] for i in range(args.seqs)], args.context, args.steps)
    print(f"decode step, {args.seqs} seqs x {args.context} ctx, {args.quantization}, torch threads "
          f"{torch.get_num_threads()}: no adapters {plain:.1f} ms | {args.loras} rank-{args.rank} loaded, "
          f"unused {unused:.1f} ms | every seq under one, all {args.loras} mixed {mixed:.1f} ms "
          f"({mixed / plain - 1:+.0%})")


if __name__ == "__main__":
    main()
