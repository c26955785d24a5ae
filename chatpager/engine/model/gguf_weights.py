"""A GGUF file's own 4-bit linear weights, read without inflating them to floats.

Q4_0 and Q4_1 store each row in blocks of 32 weights: a float16 scale `d` (Q4_1 also a float16
minimum `m`) and 32 four-bit codes `q`, low nibbles first (weights 0-15), then high nibbles
(16-31). A weight is `d * q + m` (Q4_1) or `d * (q - 8)` (Q4_0): grouped affine int4 exactly,
so `GroupedInt4` holds the codes as they are and only the group constants change format.

llama.cpp stores the q and k projections of "llama" files with their rows permuted for its
RoPE layout; rows are undone here as transformers does when it converts the file, and the
caller checks the result against that conversion.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GROUP = 32
# GGUF tensor name part -> Hugging Face module name
_LINEAR = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


@dataclass(slots=True)
class GroupedInt4:
    """w[n, k] = scale[n, k // 32] * codes[n, k] + minimum[n, k // 32]."""

    codes: torch.Tensor  # uint8 [N, K], values 0..15
    scale: torch.Tensor  # float32 [N, K // 32]
    minimum: torch.Tensor  # float32 [N, K // 32]

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        w = self.codes.view(n, k // GROUP, GROUP).float() * self.scale.unsqueeze(-1) + self.minimum.unsqueeze(-1)
        return w.view(n, k)

    def rows(self, index: torch.Tensor) -> "GroupedInt4":
        return GroupedInt4(self.codes[index], self.scale[index], self.minimum[index])


def _unpack_blocks(raw: np.ndarray, rows: int, cols: int, has_min: bool) -> GroupedInt4:
    header = 4 if has_min else 2
    blocks = raw.reshape(rows, cols // GROUP, header + GROUP // 2)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., header:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, cols)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if has_min else -8.0 * d
    return GroupedInt4(torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(d),
                       torch.from_numpy(np.ascontiguousarray(m)))


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (same as transformers' reverse permute)."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)


def read_int4_linears(path: Path) -> dict[str, GroupedInt4] | None:
    """Every linear weight of the file's layers by Hugging Face name (`model.layers.3.mlp.up_proj.weight`),
    or None when any of them is not Q4_0 / Q4_1 (the file is then used through its float conversion)."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_heads = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    kinds = {gguf.GGMLQuantizationType.Q4_0: False, gguf.GGMLQuantizationType.Q4_1: True}
    out: dict[str, GroupedInt4] = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.{i}.{kind}.weight
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LINEAR:
            continue
        if t.tensor_type not in kinds:
            return None
        cols, rows = (int(x) for x in t.shape)  # GGUF lists the fastest-varying dimension first
        w = _unpack_blocks(np.asarray(t.data), rows, cols, kinds[t.tensor_type])
        if arch == "llama" and parts[2] in ("attn_q", "attn_k"):
            w = w.rows(_unpermute_rows(rows, heads if parts[2] == "attn_q" else kv_heads))
        out[f"model.layers.{parts[1]}.{_LINEAR[parts[2]]}.weight"] = w
    return out or None
