"""The engine's command-line options, shared by every front end (TUI, `serve`, `bench`).

`add_engine_args(parser)` adds them; `EngineArgs.from_namespace(args)` reads them back into one
record whose `llm_kwargs()` are the keyword arguments of `LLM(...)`. Only argparse is imported
here: front ends parse their command line before torch loads.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

MIB = 2**20


@dataclass(frozen=True, slots=True)
class EngineArgs:
    model: str | None = None  # None: the default model
    num_blocks: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: the engine's default
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    attention: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    preemption_mode: str = "recompute"
    enable_prefix_caching: bool = True
    quantization: str = "auto"
    kv_cache_dtype: str = "auto"
    speculative: str | None = None  # "ngram": prompt-lookup speculative decoding
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    lora_adapters: dict[str, str] | None = None  # name -> PEFT adapter directory (--lora name=path)
    max_loras: int = 4

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "EngineArgs":
        mib = args.kv_cache_memory
        return cls(
            model=args.model, num_blocks=args.num_blocks, block_size=args.block_size,
            kv_cache_memory=None if mib is None else int(mib * MIB),
            max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
            attention=args.attention, device=args.device, dtype=args.dtype,
            preemption_mode=args.preemption_mode, enable_prefix_caching=not args.no_prefix_caching,
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
            prompt_lookup_max=args.prompt_lookup_max, prompt_lookup_min=args.prompt_lookup_min,
            lora_adapters=args.lora, max_loras=args.max_loras,
        )

    def llm_kwargs(self) -> dict:
        return asdict(self)


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _lora(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a PEFT adapter directory), got {text!r}")
    return name.strip(), path.strip()


class _AddLora(argparse.Action):
    """Collect repeated --lora NAME=PATH into {name: path}; a name given twice is an error."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        adapters = dict(getattr(namespace, self.dest) or {})
        name, path = value
        if name in adapters:
            parser.error(f"--lora: the adapter name {name!r} is given twice")
        adapters[name] = path
        setattr(namespace, self.dest, adapters)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--num-blocks", type=_positive(int), help="KV blocks in the pool (default: sized from memory)")
    g.add_argument("--block-size", type=_positive(int), default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--kv-cache-memory", type=_positive(float), metavar="MIB",
                   help="KV pool size in MiB (default: 256 on CPU, 85%% of free memory on CUDA)")
    g.add_argument("--max-model-len", type=_positive(int), help="context per sequence (default: the model's)")
    g.add_argument("--max-num-batched-tokens", type=_positive(int),
                   help="token budget per engine step (default: 512 on CPU, 8192 on CUDA)")
    g.add_argument("--attention", choices=("auto", "cpu", "torch", "triton"), default="auto",
                   help="auto: Triton on CUDA; on a CPU the C kernels (cpu) where they build, else the torch reference")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    g.add_argument("--preemption-mode", choices=("recompute", "swap"), default="recompute",
                   help="what happens to a sequence when the pool runs out (default: recompute)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    g.add_argument("--quantization", choices=("auto", "none", "int8", "int4"), default="auto",
                   help="weights: auto (default) runs a GGUF's own 4-bit weights on CPU, anything else "
                   "unquantized; int8 / int4 quantize on load (CPU only)")
    g.add_argument("--kv-cache-dtype", choices=("auto", "float32", "bfloat16", "float16", "fp8", "int8"),
                   default="auto", help="KV cache storage; fp8/int8 hold ~4x the blocks of fp32 (default: auto, "
                   "the model's dtype)")
    g.add_argument("--speculative", choices=("ngram",), default=None,
                   help="speculative decoding: ngram proposes the tokens that followed an earlier "
                   "occurrence of the last few tokens (fast on edits and quotes of the input; off by default)")
    g.add_argument("--num-speculative-tokens", type=_positive(int), default=4,
                   help="tokens proposed per step with --speculative (default: 4)")
    g.add_argument("--prompt-lookup-max", type=_positive(int), default=4,
                   help="longest suffix (tokens) --speculative ngram looks up (default: 4)")
    g.add_argument("--prompt-lookup-min", type=_positive(int), default=2,
                   help="shortest suffix (tokens) --speculative ngram looks up (default: 2)")
    g.add_argument("--lora", type=_lora, action=_AddLora, metavar="NAME=PATH",
                   help="load a LoRA adapter (a PEFT directory) as NAME; requests pick it by name; repeatable")
    g.add_argument("--max-loras", type=_positive(int), default=4,
                   help="most LoRA adapters loaded at once; all --lora adapters stay loaded (default: 4)")
