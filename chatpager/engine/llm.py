"""The user-facing API: `LLM(...)` loads a model and builds the engine; `generate` and `chat`
run requests to completion. `llm.engine` is the step-level API underneath."""
from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, Mapping, Sequence as Seq

import torch

from chatpager.engine.config import EngineConfig, ModelConfig
from chatpager.engine.decoding.beam_search import BeamSearchOutput
from chatpager.engine.decoding.spec_decode import SpeculativeConfig
from chatpager.engine.llm_engine import LLMEngine
from chatpager.engine.model.attention import select_backend
from chatpager.engine.model.decoder import Model
from chatpager.engine.model.kv_cache import KVCache
from chatpager.engine.model.kv_quant import KVFormat, resolve_kv_format
from chatpager.engine.model.loader import (eos_token_ids, load_int4_codes, load_model_config, load_state_dict,
                                           load_tokenizer, resolve_model_dir)
from chatpager.engine.model.lora import load_adapters
from chatpager.engine.model.lora_layers import LoraWeights
from chatpager.engine.model.quantization import check_quantization, resolve_quantization
from chatpager.engine.model.runner import ModelRunner
from chatpager.engine.outputs import RequestOutput, Sample
from chatpager.engine.sampling_params import BeamSearchParams, SamplingParams
from chatpager.errors import ModelLoadError

CPU_KV_CACHE_BYTES = 256 * 2**20
CUDA_FREE_MEMORY_FRACTION = 0.85
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
Message = dict[str, str]


def _pick_device(device: str) -> torch.device:
    if device == "auto":  # CUDA, then Apple's MPS, then the CPU
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but no CUDA device is available")
    return dev


def _keep_freed_memory() -> None:
    """CPU inference frees and re-allocates multi-MiB activations in every layer. glibc's
    defaults hand such blocks back to the kernel and map them again next time, so each layer
    page-faults through fresh zeroed pages (measured: a 32-sequence decode step of the default
    model took 720 ms instead of 430). Keep freed memory in the heap instead."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or platform.libc_ver()[0] != "glibc":
        return
    mallopt = ctypes.CDLL(name).mallopt
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # glibc's ceiling; larger blocks are mapped anyway
    mallopt(M_TRIM_THRESHOLD, 2**30)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Building the model (packing, quantizing, concatenating weights) is hundreds of small
    memory-bound ops: a second OpenMP thread gains nothing there and, on a busy machine, spins at
    every op's barrier. Default model at load average 3.7-3.9, one thread vs two: int4 0.14-0.29
    vs 0.31-2.75 s, int8 0.70 vs 2.3-11.6 s, unquantized 0.4 vs 1.7 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def _model_max_len(cfg: ModelConfig) -> int:
    limit = cfg.max_position_embeddings
    if cfg.sliding_window and not cfg.uniform_sliding_window:  # full attention on mixed layers: stay inside
        limit = min(limit, cfg.sliding_window)
    params = cfg.rope_parameters
    if params["rope_type"] == "dynamic":
        limit = min(limit, params.get("original_max_position_embeddings", limit))
    return limit


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, block_size: int = 16,
                 num_blocks: int | None = None, kv_cache_memory: int | None = None,
                 device: str = "auto", dtype: str | torch.dtype = "auto", attention: str = "auto",
                 enable_prefix_caching: bool = True, max_model_len: int | None = None,
                 preemption_mode: str = "recompute", max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, quantization: str = "auto",
                 kv_cache_dtype: str = "auto", speculative: str | None = None,
                 num_speculative_tokens: int = 4, prompt_lookup_max: int = 4, prompt_lookup_min: int = 2,
                 lora_adapters: Mapping[str, str | os.PathLike] | None = None, max_loras: int = 4,
                 progress: Callable[[str, float | None], None] | None = None) -> None:
        """`quantization`: "auto", "none", "int8" or "int4" (`chatpager.engine.model.quantization`);
        "auto" runs a GGUF's own 4-bit weights on CPU and everything else unquantized.
        `kv_cache_dtype`: "auto" (the model's dtype), "float32", "bfloat16", "float16", "fp8" or
        "int8" (`chatpager.engine.model.kv_quant`).
        `speculative="ngram"`: prompt-lookup speculative decoding (`chatpager.engine.decoding.spec_decode`),
        up to `num_speculative_tokens` proposed per step from an earlier occurrence of the last
        `prompt_lookup_max` .. `prompt_lookup_min` tokens.
        `lora_adapters`: {name: PEFT adapter directory}, at most `max_loras`, all kept loaded;
        a request picks one with `SamplingParams(lora=name)` (`chatpager.engine.model.lora`)."""
        spec = None if speculative in (None, "none") else SpeculativeConfig(
            speculative, num_speculative_tokens, prompt_lookup_max, prompt_lookup_min)
        config = EngineConfig(block_size=block_size, num_blocks=num_blocks, kv_cache_memory=kv_cache_memory,
                              enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              preemption_mode=preemption_mode)
        dev = _pick_device(device)
        if dev.type == "cpu":
            _keep_freed_memory()
        dt = _pick_dtype(dtype, dev)
        kv_format = resolve_kv_format(kv_cache_dtype, dt, dev)
        check_quantization(quantization, dev)
        if progress:
            progress("reading model config", None)
        model_dir = resolve_model_dir(model, progress)
        mcfg = load_model_config(model_dir)
        adapters = load_adapters(lora_adapters, max_loras, mcfg, dt, dev)  # before the weights: fail fast
        backend = select_backend(attention, dev, kv_quantized=kv_format.quantized,
                                 sliding_window=mcfg.uniform_sliding_window)
        limit = _model_max_len(mcfg)
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's limit {limit}")
        max_len = max_model_len or limit
        self.tokenizer = load_tokenizer(model_dir)
        if progress:
            progress("loading weights", 0.0)
        codes = None
        if dev.type == "cpu" and quantization in ("auto", "int4"):
            codes = load_int4_codes(model, model_dir, progress)
        quant = resolve_quantization(quantization, dev, codes is not None)
        weights = load_state_dict(model_dir, progress)
        with _one_thread():
            self.model = Model(mcfg, weights, dev, dt, max_positions=max_len, quantization=quant,
                               int4_weights=codes)
        del weights
        kv = KVCache(mcfg.num_layers, self._num_blocks(config, mcfg, kv_format, dev), block_size,
                     mcfg.num_kv_heads, mcfg.head_dim, kv_format.storage, dev, scaled=kv_format.quantized)
        runner = ModelRunner(self.model, kv, backend, dev,
                             lora=LoraWeights(adapters, mcfg, dt, dev) if adapters else None)
        name = "SmolLM2-135M-Instruct" if model is None else os.path.basename(os.path.normpath(str(model)))
        self.model_info = {"name": name, "path": str(model_dir), "device": str(dev),
                           "dtype": str(dt).removeprefix("torch."), "attention": backend.name,
                           "quantization": quant, "kv_cache_dtype": kv_format.name,
                           "kv_bytes_per_block": kv.bytes_per_block,
                           "lora_adapters": [a.name for a in adapters],
                           "threads": torch.get_num_threads()}  # torch's CPU threads in this process
        budget = max_num_batched_tokens or (512 if dev.type == "cpu" else 8192)
        self.engine = LLMEngine(runner, self.tokenizer, eos_token_ids(model_dir, mcfg, self.tokenizer),
                                config, max_len, budget, self.model_info, speculative=spec)
        if progress:
            progress("ready", 1.0)

    @staticmethod
    def _num_blocks(config: EngineConfig, mcfg: ModelConfig, kv_format: KVFormat, dev: torch.device) -> int:
        if config.num_blocks is not None:
            return config.num_blocks
        budget = config.kv_cache_memory
        if budget is None:
            if dev.type == "cuda":
                budget = int(torch.cuda.mem_get_info(dev)[0] * CUDA_FREE_MEMORY_FRACTION)
            else:
                budget = CPU_KV_CACHE_BYTES
        n = budget // (kv_format.bytes_per_token(mcfg) * config.block_size)
        if n < 1:
            raise ValueError(f"kv_cache_memory={budget} bytes holds not even one block")
        return int(n)

    # --- convenience API -----------------------------------------------------------------
    def stats(self) -> dict:
        return self.engine.stats()

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """Token ids of a conversation with the model's chat template and a generation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelLoadError("this model's tokenizer has no chat template; use generate() instead")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 params: SamplingParams | None = None, cache_salt: str | None = None) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; outputs in prompt order.
        `cache_salt`: share cached blocks only with requests of the same salt (tenant isolation)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        ids = [self.engine.add_request(p, params, cache_salt=cache_salt) for p in prompts]
        return self._run(ids)

    def chat(self, conversations: list[Message] | list[list[Message]],
             params: SamplingParams | None = None, cache_salt: str | None = None) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.encode_chat(c) for c in conversations], params, cache_salt=cache_salt)

    def beam_search(self, prompts: str | list[int] | Seq[str | list[int]],
                    params: BeamSearchParams | None = None, cache_salt: str | None = None) -> list[BeamSearchOutput]:
        """Beam search for every prompt, batched together; one output per prompt, in order, its
        `sequences` best first. Beams share their blocks (fork, copy on write)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or BeamSearchParams()
        ids = [self.engine.add_beam_search(p, params, cache_salt=cache_salt) for p in prompts]
        while self.engine.has_unfinished():
            self.engine.step()
        return [self.engine.beams.result(i) for i in ids]

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        results = []
        for rid in ids:
            group = [final[rid]] + sorted(
                (o for o in final.values() if o.parent_id == rid and "." in o.request_id),
                key=lambda o: int(o.request_id.rsplit(".", 1)[1]))
            samples = tuple(Sample(o.request_id, o.token_ids, o.text, o.finish_reason) for o in group)
            results.append(_with_samples(final[rid], samples))
        return results


def _with_samples(out: RequestOutput, samples: tuple[Sample, ...]) -> RequestOutput:
    from dataclasses import replace

    return replace(out, samples=samples)
