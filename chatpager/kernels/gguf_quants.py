"""GGUF weight encodings as stored: the block table, a matrix of raw blocks, and the torch
reference of what its blocks mean.

A GGUF matrix of N rows (output features) by K columns (input features) is stored row after
row; a row is K / block_size blocks of `block_bytes` bytes (`BLOCKS`). `GGUFMatrix` holds those
bytes as they are in the file (a uint8 tensor [N, row_bytes], usually a view of the
memory-mapped file), never a float copy. What a block means is defined by the `gguf` package's
numpy `gguf.quants.dequantize`: `dequantize` here must equal it (tests/kernels/
test_gguf_quants.py), and every kernel that multiplies a GGUFMatrix is held to it.

Exactness: `dequantize` equals the oracle bit for bit for every type in `BLOCKS`, by
construction: every product in a block's formula is exact in float32 (a float16 scale has 11
significant bits, a 6-bit sub-block scale or an int8 one at most 7 more, a code at most 6 more:
Q6_K's (d * scale) * (q - 32) needs 11 + 7 + 6 = 24, float32's 24), so the only rounding is the one
addition of a min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K: d * q + m, (d * sc) * q - (dmin * mn)). Any order
of the products, and a fused multiply-add for that last step, give the same bits: a kernel that
decodes to float32 can match the oracle exactly too. Bytes are read in the host's order, which
must be little-endian, as GGUF files are.

Cost: the torch functions here are vectorised over all blocks of the rows asked (no Python
loop over blocks); `matmul_torch` is the fallback where no C kernel runs and dequantizes the
whole matrix on every call, a bounded chunk of rows at a time.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

# GGML type id (gguf.GGMLQuantizationType) -> (name, weights per block, bytes per block)
BLOCKS: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
TYPE_IDS = {name: type_id for type_id, (name, _, _) in BLOCKS.items()}


def type_name(type_id: int) -> str:
    return BLOCKS[type_id][0] if type_id in BLOCKS else f"type {type_id}"


@dataclass(frozen=True, slots=True)
class GGUFMatrix:
    """w[n, k] for n < rows, k < cols, as the file stores it: `data` uint8 [rows, row_bytes]."""

    type_id: int
    data: torch.Tensor
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.type_id not in BLOCKS:
            raise ValueError(f"unsupported GGUF tensor type {self.type_id}")
        _, block, nbytes = BLOCKS[self.type_id]
        if self.cols % block:
            raise ValueError(f"{type_name(self.type_id)} needs a row length that is a multiple of {block}, "
                             f"got {self.cols}")
        want = (self.rows, self.cols // block * nbytes)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want:
            raise ValueError(f"{type_name(self.type_id)} [{self.rows}, {self.cols}] needs uint8 data of shape "
                             f"{list(want)}, got {self.data.dtype} {list(self.data.shape)}")

    @property
    def name(self) -> str:
        return BLOCKS[self.type_id][0]

    @property
    def row_bytes(self) -> int:
        _, block, nbytes = BLOCKS[self.type_id]
        return self.cols // block * nbytes

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def select_rows(self, index: torch.Tensor) -> GGUFMatrix:
        """These rows only (a copy of their blocks): a row permutation, or an embedding lookup."""
        return GGUFMatrix(self.type_id, self.data[index], int(index.numel()), self.cols)


# --- reading fields out of blocks [n, block_bytes] uint8 --------------------------------------

def _reinterpret(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of `raw` (uint8, last dim contiguous) as `dtype`: a view where the alignment
    allows one, else a view of a copy."""
    try:
        return raw.view(dtype)
    except RuntimeError:  # an odd storage offset or stride: the bytes are fine, their address is not
        return raw.clone().view(dtype)


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block, as float32 [n, 1]."""
    return _reinterpret(blocks[:, at:at + 2], torch.float16).float()


def _planes(packed: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """Bit fields of each byte: [..., L] -> [..., len(shifts), L], plane p = (byte >> shifts[p]) & mask.
    GGUF packs a run of L codes, then the next run in the next bits of the same bytes."""
    by = torch.tensor(shifts, dtype=torch.uint8).view(-1, 1)
    return (packed.unsqueeze(-2) >> by) & mask


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., L] bytes -> [..., 2 L] codes: the L low nibbles, then the L high ones."""
    return _planes(packed, (0, 4), 0xF).flatten(-2)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes (a little-endian uint32) -> [n, 32] bits, bit j of the word at j."""
    return (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)).flatten(-2) & 1


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, float32 [n, 8] each.
    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; bytes 8-11 hold the low
    4 bits of scale / min 4-7 (low / high nibble), whose top 2 bits sit in bytes 0-3 / 4-7's top 2."""
    lo_sc, lo_mn, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([lo_sc & 0x3F, (hi & 0xF) | ((lo_sc >> 2) & 0x30)], dim=1)
    mins = torch.cat([lo_mn & 0x3F, (hi >> 4) | ((lo_mn >> 2) & 0x30)], dim=1)
    return scales.float(), mins.float()


# --- one function per type: blocks [n, block_bytes] uint8 -> weights [n, block] float32 ---------
# Each states its block as llama.cpp's ggml-common.h declares it (byte offsets in brackets).

def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0] | qs 16 B [2]: weight i < 16 = low nibble of qs[i], i >= 16 high nibble of qs[i - 16]
    return _half(b, 0) * (_nibbles(b[:, 2:18]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0] | m f16 [2] | qs 16 B [4]: d * q + m
    return _half(b, 0) * _nibbles(b[:, 4:20]).float() + _half(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0] | qh u32 [2]: the 5th bit of weight j at bit j | qs 16 B [6] as Q4_0
    q = _nibbles(b[:, 6:22]) | (_bits(b[:, 2:6]) << 4)
    return _half(b, 0) * (q.float() - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0] | m f16 [2] | qh u32 [4] | qs 16 B [8]: d * q + m
    q = _nibbles(b[:, 8:24]) | (_bits(b[:, 4:8]) << 4)
    return _half(b, 0) * q.float() + _half(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0] | qs 32 x int8 [2]
    return b[:, 2:34].view(torch.int8).float() * _half(b, 0)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    # scales 16 B [0]: per 16 weights, low nibble a scale, high nibble a min | qs 64 B [16]: 2-bit
    # codes, each 32-byte half holding 4 runs of 32 weights (bits 0-1, 2-3, 4-5, 6-7)
    # | d f16 [80] | dmin f16 [82]: weight = (d * scale) * q - (dmin * min)
    n = b.shape[0]
    sc = b[:, 0:16]
    d = (_half(b, 80) * (sc & 0xF).float()).unsqueeze(-1)
    m = (_half(b, 82) * (sc >> 4).float()).unsqueeze(-1)
    q = _planes(b[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    return (d * q - m).reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    # hmask 32 B [0]: bit s of byte j is the 3rd bit of weight 32 s + j | qs 64 B [32]: low 2 bits
    # as Q2_K | scales 12 B [96]: sixteen 6-bit scales, minus 32 | d f16 [108]
    # weight = (d * scale) * (low - 4 * (1 - high)): a set high bit means no offset
    n = b.shape[0]
    sc = b[:, 96:108]
    low4 = _planes(sc[:, 0:8], (0, 4), 0xF).reshape(n, 16)      # scale i: byte i % 8, nibble i // 8
    high2 = _planes(sc[:, 8:12], (0, 2, 4, 6), 3).reshape(n, 16)  # scale i: byte 8 + i % 4, bits 2 (i // 4)
    scale = (low4 | (high2 << 4)).float() - 32
    d = (_half(b, 108) * scale).unsqueeze(-1)
    low = _planes(b[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    high = _planes(b[:, 0:32], tuple(range(8)), 1).reshape(n, 16, 16)
    q = low.float() - ((high ^ 1) << 2).float()
    return (d * q).reshape(n, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0] | dmin f16 [2] | scales 12 B [4] (`_k_scales_mins`) | qs 128 B [16]: per 64
    # weights 32 bytes, low nibbles the first 32 weights; weight = (d * scale) * q - (dmin * min)
    n = b.shape[0]
    scale, mins = _k_scales_mins(b[:, 4:16])
    d = (_half(b, 0) * scale).unsqueeze(-1)
    m = (_half(b, 2) * mins).unsqueeze(-1)
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (d * q - m).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0] | dmin f16 [2] | scales 12 B [4] | qh 32 B [16]: bit s of byte j is the 5th bit of
    # weight 32 s + j | qs 128 B [48] as Q4_K
    n = b.shape[0]
    scale, mins = _k_scales_mins(b[:, 4:16])
    d = (_half(b, 0) * scale).unsqueeze(-1)
    m = (_half(b, 2) * mins).unsqueeze(-1)
    low = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = _planes(b[:, 16:48], tuple(range(8)), 1)
    q = (low | (high << 4)).float()
    return (d * q - m).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # ql 128 B [0]: low 4 bits, per 128 weights 64 bytes (low nibbles weights 0-63) | qh 64 B [128]:
    # high 2 bits, per 128 weights 32 bytes of 4 runs | scales 16 x int8 [192] | d f16 [208]
    # weight = (d * scale) * (q - 32), a scale per 16 weights
    n = b.shape[0]
    d = (_half(b, 208) * b[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
    low = _nibbles(b[:, 0:128].reshape(n, 2, 64))
    high = _planes(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 2, 128)
    q = ((low | (high << 4)).float() - 32).reshape(n, 16, 16)
    return (d * q).reshape(n, 256)


_DEQUANTIZE = {
    0: lambda b: _reinterpret(b, torch.float32),
    1: lambda b: _reinterpret(b, torch.float16).float(),
    30: lambda b: _reinterpret(b, torch.bfloat16).float(),
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0,
    10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k,
}


CHUNK_WEIGHTS = 1 << 18  # weights decoded at a time: 1 MiB of float32, so the temporaries stay in cache


def _decode(m: GGUFMatrix, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of w as float32 [stop - start, cols]."""
    blocks = m.data[start:stop].reshape(-1, BLOCKS[m.type_id][2])
    return _DEQUANTIZE[m.type_id](blocks).reshape(stop - start, m.cols)


def _row_chunks(m: GGUFMatrix) -> Iterator[tuple[int, int]]:
    """(start, stop) over the rows, about CHUNK_WEIGHTS weights each (at least one row)."""
    step = max(1, CHUNK_WEIGHTS // m.cols)
    for start in range(0, m.rows, step):
        yield start, min(start + step, m.rows)


def dequantize(m: GGUFMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w as floats [rows, cols]: computed in float32 (the oracle's values, bit for bit), then cast
    to `dtype`. F32 in float32 is a view of the stored bytes, not a copy. Decoded CHUNK_WEIGHTS
    at a time into the result, which is several times faster on a large matrix than decoding it
    whole (the temporaries of a chunk stay in cache)."""
    if m.type_id == TYPE_IDS["F32"] and dtype == torch.float32:
        return _decode(m, 0, m.rows)
    out = torch.empty(m.rows, m.cols, dtype=dtype)
    for start, stop in _row_chunks(m):
        out[start:stop] = _decode(m, start, stop)
    return out


def dequantize_rows(m: GGUFMatrix, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `index` of w, [*index.shape, cols]: an embedding lookup; only those rows are decoded."""
    rows = dequantize(m.select_rows(index.reshape(-1)), dtype)
    return rows.reshape(*index.shape, m.cols)


def matmul_torch(x: torch.Tensor, m: GGUFMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias): [M, K] -> [M, N], in x's dtype, where no C kernel runs (ARM, no compiler).

    Cost: every call decodes all N x K weights again, a chunk of rows of about CHUNK_WEIGHTS
    weights at a time, and multiplies each chunk with torch's matmul. Nothing decoded outlives its
    chunk: the extra memory is ~10 MiB (a chunk's floats and the decoder's temporaries, measured on
    a Q6_K 8192 x 4096 matrix, 128 MiB as floats) whatever the matrix, and no float copy stays
    alive between calls. Time, measured on two cores: ~1-3 ns per weight of decoding (a Q4_K
    4096 x 4096 matrix ~15-25 ms at M = 1, 5-7x torch's float matmul; ~50 ms at M = 64, 3x).
    """
    if x.dim() != 2 or x.shape[1] != m.cols:
        raise ValueError(f"x must be [M, {m.cols}] for a {m.name} [{m.rows}, {m.cols}] matrix, got {list(x.shape)}")
    out = x.new_empty(x.shape[0], m.rows)
    for start, stop in _row_chunks(m):
        w = _decode(m, start, stop).to(x.dtype)
        out[:, start:stop] = x @ w.T if bias is None else torch.addmm(bias[start:stop], x, w.T)
    return out


def quantize_q8_0(w: torch.Tensor) -> GGUFMatrix:
    """w [N, K] (K a multiple of 32) as Q8_0 blocks, the bytes `gguf.quants.quantize(w, Q8_0)`
    (and llama.cpp's reference quantizer) writes: per 32 weights d = max |w| / 127 in float32,
    stored as float16, and codes round(w / d) (w times the float32 reciprocal of d, rounded half
    away from zero; all zero where d is 0). The fast CPU path for bf16 / fp16 checkpoints."""
    if w.dim() != 2 or w.shape[1] % 32:
        raise ValueError(f"Q8_0 needs a matrix [N, K] with K a multiple of 32, got {list(w.shape)}")
    rows, cols = w.shape
    g = w.to(torch.float32).reshape(-1, 32)
    d = g.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), d.reciprocal())
    v = g * inv
    a = v.abs()
    whole = a.floor()  # round half away from zero, as gguf does it: a + 0.5 could round up in float32
    q = torch.sign(v) * (whole + torch.floor(2 * (a - whole)))
    blocks = torch.cat([d.to(torch.float16).view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)
    return GGUFMatrix(TYPE_IDS["Q8_0"], blocks.reshape(rows, -1), rows, cols)
