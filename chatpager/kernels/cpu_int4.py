"""Grouped int4 weight matmul on AVX512-VNNI CPUs: `cpu_int4.cpp`, built at first use.

`pack(codes, scale, minimum)` turns grouped affine int4 weights (w = scale * code + minimum,
groups of 32 along the input) into the kernel's layout once, at load; `Int4Matmul(packed, n, k,
bias)(x)` is then y = x @ w.T + bias in float32, the activations rounded to two int8 digits per
group of 32 inside the call (~15 bits of each group's range; see the .cpp for the layout and the
arithmetic). `.normed(h, weight, eps)` and `.swiglu(gate_up)` also apply the model's RMSNorm or
SwiGLU activation to the input as the kernel reads it, saving the ATen ops and the tensor between.
Few rows is what it is for: each weight byte is read from memory once per call, however many rows.

The library is built and loaded by `cpu_build` (g++ at first use, cached by source, flags and
compiler). `available()` is False — with one logged line saying why — when the CPU lacks the
instructions, g++ is missing or the build fails, or when CHATPAGER_CPU_INT4=0 (to compare);
callers then use torch's own int4 op. Its threads are torch's OpenMP threads.

Invariants: the packed layout depends on nothing but the weights (no CPU-specific packing);
d and m are stored as float16, exact for GGUF Q4_0 / Q4_1 (`pack` refuses values float16
cannot hold, and the caller falls back); the input size is a multiple of 32.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from chatpager.kernels import cpu_build

log = logging.getLogger(__name__)

GROUP = 32
TILE_N = 16
SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = (*cpu_build.AVX512_FLAGS, "-mavx512vnni")
NEEDED_CPU_FLAGS = (*cpu_build.AVX512_CPU_FLAGS, "avx512_vnni")


_PLAIN, _RMS_NORM, _SWIGLU = 0, 1, 2  # the kernel's prologues: what it multiplies, made from its input
_PROFILE_NAMES = ("cpu_int4::mm", "cpu_int4::rms_norm_mm", "cpu_int4::swiglu_mm")


class _Weight(ctypes.Structure):
    _fields_ = [("packed", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("bias", ctypes.c_void_p)]


def _cpu_supports() -> bool:
    return cpu_build.cpu_supports(NEEDED_CPU_FLAGS)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load(SOURCE, FLAGS, NEEDED_CPU_FLAGS, "CHATPAGER_CPU_INT4", "torch's int4 op", log)
    if lib is None:
        return None
    lib.cpu_int4_packed_bytes.argtypes, lib.cpu_int4_packed_bytes.restype = [ctypes.c_int64] * 2, ctypes.c_int64
    lib.cpu_int4_mm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(_Weight), ctypes.c_void_p,
                                ctypes.c_int, ctypes.c_void_p, ctypes.c_float]
    lib.cpu_int4_mm.restype = None
    lib.cpu_int4_pack.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.cpu_int4_pack.restype = None
    return lib


def available() -> bool:
    """Whether the kernel runs here (built, or loaded from the cache, on first call)."""
    return _library() is not None


def pack(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor | None:
    """The kernel's layout of w[n, k] = scale[n, k // 32] * codes[n, k] + minimum[n, k // 32]
    (codes uint8 0..15), as a flat uint8 tensor; None when a scale or minimum overflows float16.
    Needs the library (`available()`)."""
    n, k = codes.shape
    if k % GROUP:
        raise ValueError(f"int4 needs the input size to be a multiple of {GROUP}, got {k}")
    d, m = scale.to(torch.float16).contiguous(), minimum.to(torch.float16).contiguous()
    if not (torch.isfinite(d).all() and torch.isfinite(m).all()):
        return None
    lib = _library()
    codes = codes.to(torch.uint8).contiguous()
    out = torch.zeros(lib.cpu_int4_packed_bytes(n, k), dtype=torch.uint8)
    lib.cpu_int4_pack(codes.data_ptr(), d.data_ptr(), m.data_ptr(), n, k, out.data_ptr())
    return out


class Int4Matmul:
    """y = x @ w.T + bias for one packed weight: float32 in and out (other dtypes are converted).
    Holds the packed tensor and the bias, which the kernel reads through raw pointers."""

    __slots__ = ("packed", "bias", "out_features", "in_features", "_weight", "_call")

    def __init__(self, packed: torch.Tensor, n: int, k: int, bias: torch.Tensor | None = None) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError("the cpu_int4 kernel does not run here (see the log)")
        if packed.numel() != lib.cpu_int4_packed_bytes(n, k):
            raise ValueError(f"packed weight has {packed.numel()} bytes, "
                             f"[{n}, {k}] needs {lib.cpu_int4_packed_bytes(n, k)}")
        self.packed, self.out_features, self.in_features = packed, n, k
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self._weight = _Weight(packed.data_ptr(), n, k, None if self.bias is None else self.bias.data_ptr())
        self._call = lib.cpu_int4_mm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the per-call Python work is kept to the bone: a decode step makes ~120 of these calls
        if x.dtype is not torch.float32:
            return self(x.float()).to(x.dtype)
        if x.dim() != 2 or not x.is_contiguous():
            return self(x.reshape(-1, x.shape[-1]).contiguous()).view(*x.shape[:-1], self.out_features)
        if x.shape[1] != self.in_features:
            raise ValueError(f"input has {x.shape[1]} features, the weight takes {self.in_features}")
        return self._run(x, _PLAIN, None, 0.0)

    def normed(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """self(rms_norm(x, weight, eps)) for float32 x [n, k], the norm done inside the kernel
        (one pass over x instead of ~6 ATen ops); weight float32 [k]."""
        if (x.dtype is not torch.float32 or weight.dtype is not torch.float32 or x.dim() != 2
                or not (x.is_contiguous() and weight.is_contiguous())):
            raise ValueError("normed takes contiguous float32 [n, k] inputs and a float32 norm weight")
        if x.shape[1] != self.in_features or weight.shape != (self.in_features,):
            raise ValueError(f"input / norm weight must have {self.in_features} features")
        return self._run(x, _RMS_NORM, weight.data_ptr(), eps)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) for float32 gate_up [n, 2 k] = [gate, up], the activation done
        inside the kernel as it reads its input."""
        if gate_up.dtype is not torch.float32 or gate_up.dim() != 2 or not gate_up.is_contiguous():
            raise ValueError("swiglu takes a contiguous float32 [n, 2 k] input")
        if gate_up.shape[1] != 2 * self.in_features:
            raise ValueError(f"gate_up must have {2 * self.in_features} features, got {gate_up.shape[1]}")
        return self._run(gate_up, _SWIGLU, None, 0.0)

    def _run(self, x: torch.Tensor, prologue: int, norm: int | None, eps: float) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.out_features)
        cpu_build.call(_PROFILE_NAMES[prologue], self._call, x.data_ptr(), x.shape[0], self._weight, y.data_ptr(),
                       prologue, norm, eps)
        return y
