"""Attention metadata for one step, and the backend that reads/writes the paged cache.

The metadata is built once per step by the ModelRunner and passed explicitly to every layer
(no global context). A backend is a pair of functions with the contract of
`chatpager.kernels`: write new K/V into their slots, then attend through the block tables.
A quantized KV cache (int8 / fp8 codes) passes each layer's (k_scale, v_scale) as `scales`; its
backend's write quantizes and its attention dequantizes (`chatpager.kernels.kv_quant_torch`).
An int8 cache holds K/V in a rotated basis (`kv_rotation`, orthogonal and symmetric): q, k and v
are rotated before the kernels and the output rotated back after, the same for every backend.
A model with a sliding window (every layer the same W) gets a backend that holds W: each query
attends to its last W positions, and table entries before every query's window are not read.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from chatpager.kernels import paged_attention_torch, write_kv_torch
from chatpager.kernels.kv_quant_torch import is_rotated, kv_rotation
from chatpager.kernels.paged_attention_torch import plan_paged_attention

BACKENDS = ("auto", "cpu", "torch", "triton")


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]: where each new token's K/V goes
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length after this step
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    plan: object = None  # the backend's per-step plan (AttentionBackend.plan), shared by every layer


@dataclass(frozen=True, slots=True)
class AttentionBackend:
    name: str
    write_kv: Callable[..., None]
    attend: Callable[..., torch.Tensor]
    # (block_tables, seq_lens, query_start_loc, block_size) -> plan: the layer-independent part of
    # attention, worked out once a step and handed to `attend` as `plan=`
    planner: Callable[..., object] | None = None
    sliding_window: int | None = None

    def __call__(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                 scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        rot = kv_rotation(q.shape[-1], torch.float32, q.device) if is_rotated(k_cache.dtype) else None
        if rot is not None:  # q.k and the weights p are unchanged; the output comes back rotated.
            # K/V go to the write in float32, so their codes, not a bf16 rounding, set their error.
            q, k, v = (q.float() @ rot).to(q.dtype), k.float() @ rot, v.float() @ rot
        kw = {} if scales is None else {"k_scale": scales[0], "v_scale": scales[1]}
        self.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, **kw)
        if self.sliding_window:
            kw["sliding_window"] = self.sliding_window
        args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale)
        out = self.attend(*args, **kw) if meta.plan is None else self.attend(*args, plan=meta.plan, **kw)
        return out if rot is None else (out.float() @ rot).to(out.dtype)

    def plan(self, meta: AttentionMetadata, block_size: int) -> None:
        if self.planner is not None:
            meta.plan = self.planner(meta.block_tables, meta.seq_lens, meta.query_start_loc, block_size,
                                     self.sliding_window)


def select_backend(name: str, device: torch.device, kv_quantized: bool = False,
                   sliding_window: int | None = None) -> AttentionBackend:
    """`auto`: Triton on CUDA; on a CPU, the C kernel (`cpu`) where it builds, else the torch
    reference. `triton` on CPU runs Triton's interpreter.
    `kv_quantized`: the cache holds int8 / fp8 codes with scales. `sliding_window`: every
    layer's window, None for full attention."""
    if name not in BACKENDS:
        raise ValueError(f"attention must be one of {BACKENDS}, got {name!r}")
    if name == "auto" and device.type == "cuda":
        name = "triton"
    elif name == "auto":
        from chatpager.kernels import cpu_attention

        name = "cpu" if device.type == "cpu" and cpu_attention.available() else "torch"
    if name == "cpu":
        return _cpu_backend(device, kv_quantized, sliding_window)
    if name == "torch" and kv_quantized:
        from chatpager.kernels.kv_quant_torch import (paged_attention_quant_torch, plan_quant_attention,
                                                      write_kv_quant_torch)

        return AttentionBackend("torch", write_kv_quant_torch, paged_attention_quant_torch, plan_quant_attention,
                                sliding_window)
    if name == "torch":
        return AttentionBackend("torch", write_kv_torch, paged_attention_torch, plan_paged_attention, sliding_window)
    from chatpager.kernels import paged_attention_triton, write_kv_triton

    label = "triton" if device.type == "cuda" else "triton (interpreter)"
    return AttentionBackend(label, write_kv_triton, paged_attention_triton, sliding_window=sliding_window)


def _cpu_backend(device: torch.device, kv_quantized: bool, sliding_window: int | None) -> AttentionBackend:
    from chatpager.kernels import cpu_attention
    from chatpager.kernels.paged_attention_cpu import paged_attention_cpu, plan_cpu_attention, write_kv_cpu

    if device.type != "cpu" or not cpu_attention.available():
        why = ("runs on a CPU only" if device.type != "cpu"
               else "did not build here (see the log; CHATPAGER_CPU_ATTENTION=0 also turns it off)")
        raise ValueError(f"attention 'cpu' (the C kernel) {why}: use 'auto' or 'torch'")
    if kv_quantized:  # codes are dequantized per step, then read by the kernel
        from chatpager.kernels.kv_quant_torch import (paged_attention_quant_torch, plan_quant_attention,
                                                      write_kv_quant_torch)

        return AttentionBackend("cpu", write_kv_quant_torch, paged_attention_quant_torch,
                                partial(plan_quant_attention, kernel=True), sliding_window)
    return AttentionBackend("cpu", write_kv_cpu, paged_attention_cpu, plan_cpu_attention, sliding_window)
