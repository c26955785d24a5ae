"""Linear layers: dense, or weight-only int8 / int4 for CPU decode.

Single-stream decode on a CPU is bound by the bytes of weights streamed per token, so storing
them in 8 or 4 bits is the lever (docs/ARCHITECTURE.md, "Measured facts": all layer matmuls of
SmolLM2 at one row took 40 ms in fp32, ~15 ms in int8 or int4). Modes, `LLM(quantization=...)`:
- "none": the checkpoint's weights in the model dtype, `F.linear` (the exact path).
- "int8": symmetric int8 per output channel (`aten._weight_int8pack_mm`).
- "int4": affine int4 in groups of 32 weights along the input, each with a scale and a minimum.
  From a GGUF whose layers are Q4_0 / Q4_1 the file's own codes are used unchanged
  (`gguf_weights`), otherwise a float checkpoint is quantized by each group's min / max. On
  AVX512-VNNI CPUs they run chatpager's kernel (`kernels.cpu_int4`: float32 in and out, the
  activations split into two int8 digits per group of 32, 2-3x less CPU than torch's op at
  1-16 rows); elsewhere, or if it cannot be built, `aten._weight_int4pack_mm_for_cpu`.
- "auto": "int4" on CPU when the GGUF file holds 4-bit layers (the fast path runs the file's own
  weights); otherwise "none" (a float checkpoint runs as it is; int8 / int4 are opt-in), and
  always "none" on CUDA.
Under int8 / int4 the output head is a `ShortlistHead`: the head quantized the same way scores
every token, then the best few are scored again with the float weights (kept anyway for
embedding lookups when the head is tied). The head's error lands straight on the logits:
measured on the default model, a plain int8 head moved the top token at 3% of positions; with
the shortlist rescored, the argmax is exact whenever the true best token is in the shortlist.

Invariants: torch's quantized ops run on bf16 activations — with fp32 inputs torch takes a slow
path (5-10x) — so their linears cast the input to bf16 and the output back to the caller's
dtype; the kernels are CPU ops, so int8 / int4 require device="cpu".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from chatpager.engine.model.gguf_weights import GROUP, GroupedInt4
from chatpager.kernels import cpu_int4

QUANTIZATIONS = ("auto", "none", "int8", "int4")
ACT = torch.bfloat16  # activation dtype of the quantized CPU kernels


class Linear(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class DenseLinear:
    weight: torch.Tensor  # [N, K]
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True, slots=True)
class Int8Linear:
    weight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # bf16 [N]
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(ACT), self.weight, self.scales).to(x.dtype)
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True, slots=True)
class Int4Linear:
    packed: torch.Tensor  # uint8, torch's CPU int4 layout (depends on the CPU's ISA: never stored)
    scales_zeros: torch.Tensor  # bf16 [K // 32, N', 2]: w = scale * (code - 8) + zero
    out_features: int  # N; the kernel wants N' a multiple of 16, so the padding rows are cut off
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(ACT), self.packed, GROUP, self.scales_zeros)
        if y.shape[-1] != self.out_features:
            y = y[..., :self.out_features]
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True, slots=True)
class ShortlistHead:
    """Output head: quantized logits for the whole vocabulary, the top `shortlist` recomputed exactly."""

    coarse: Linear
    weight: torch.Tensor  # [vocab, hidden] float, the head's own weights
    shortlist: int = 16

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.coarse(x)
        top = logits.topk(min(self.shortlist, logits.shape[-1]), dim=-1).indices  # [n, k]
        rows = self.weight.index_select(0, top.view(-1)).view(*top.shape, -1)  # 3x cheaper than weight[top]
        exact = torch.bmm(rows, x.to(self.weight.dtype).unsqueeze(-1)).squeeze(-1)
        return logits.scatter_(-1, top, exact.to(logits.dtype))  # logits is the coarse head's own new tensor


def check_quantization(mode: str, device: torch.device) -> None:
    """Reject a bad mode before anything is loaded."""
    if mode not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {mode!r}")
    if mode in ("int8", "int4") and device.type != "cpu":
        raise ValueError(f"quantization={mode!r} runs on CPU only (torch's weight-only kernels); "
                         f"use quantization='none' on {device.type}")


def resolve_quantization(mode: str, device: torch.device, file_has_int4: bool) -> str:
    """The mode a model actually runs in (see the module docstring for "auto")."""
    check_quantization(mode, device)
    if mode == "auto":
        return "int4" if device.type == "cpu" and file_has_int4 else "none"
    return mode


def quantize_int4(w: torch.Tensor) -> GroupedInt4:
    """Affine int4 per group of 32 input weights, by the group's min and max."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"int4 needs the input size to be a multiple of {GROUP}, got {k}")
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-10)
    codes = ((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round_().clamp_(0, 15).to(torch.uint8)
    return GroupedInt4(codes.view(n, k), scale, lo)


def int4_linear(w: GroupedInt4, bias: torch.Tensor | None = None, kernel: str = "auto") -> Linear:
    """`kernel`: "vnni" (chatpager's own, `kernels.cpu_int4`), "aten" (torch's op), or "auto": vnni
    where it runs, else aten."""
    if kernel not in ("auto", "vnni", "aten"):
        raise ValueError(f"kernel must be auto, vnni or aten; got {kernel!r}")
    if kernel != "aten" and cpu_int4.available():
        packed = cpu_int4.pack(w.codes, w.scale, w.minimum)
        if packed is not None:
            return cpu_int4.Int4Matmul(packed, *w.codes.shape, bias)
    if kernel == "vnni":
        raise RuntimeError("the cpu_int4 kernel does not run here (see the log) or the weights overflow float16")
    n = w.codes.shape[0]
    pad = -n % 16
    codes, scale, zero = w.codes, w.scale, w.minimum + 8 * w.scale  # torch's zero: the value of code 8
    if pad:
        codes, scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (codes, scale, zero))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(ACT)
    return Int4Linear(packed, scales_zeros, n, bias)


def int8_linear(w: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
    """Symmetric int8 per output channel."""
    w = w.float()
    scales = (w.abs().amax(-1) / 127).clamp_min(1e-10)
    q = (w / scales.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return Int8Linear(q, scales.to(ACT), bias)


def cat_int4(parts: list[GroupedInt4]) -> GroupedInt4:
    """Stack projections that share an input along the output axis (fused qkv, gate_up)."""
    return GroupedInt4(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                       torch.cat([p.minimum for p in parts]))
