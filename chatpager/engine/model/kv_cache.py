"""The K/V tensors of every layer, in fixed-size physical blocks.

One tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], so a block copy
(copy-on-write) or a swap moves one block of every layer in a single indexing op. This object
never decides who owns a block: the BlockPool does.

A quantized cache (int8 / fp8 codes, `chatpager.kernels.kv_quant_torch`) also holds a float32
(scale, offset) per (slot, KV head), [num_layers, 2, num_blocks, block_size, num_kv_heads, 2]:
copies and swaps move a block's scales with its codes, so its values never depend on where it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class HostKV:
    """A swapped-out sequence's blocks (all layers) in host memory."""

    data: torch.Tensor
    scales: torch.Tensor | None


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, scaled: bool = False) -> None:
        """`dtype` is the storage dtype; `scaled`: it holds codes, with a (scale, offset) per (slot, KV head)."""
        self.block_size = block_size
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)
        self.scales = (torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, 2, dtype=torch.float32,
                                   device=device) if scaled else None)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]

    def layer_scales(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(k_scale, v_scale) of layer i for a quantized cache, else None."""
        return None if self.scales is None else (self.scales[i, 0], self.scales[i, 1])

    def _tensors(self) -> list[torch.Tensor]:
        return [self.data] if self.scales is None else [self.data, self.scales]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy block src -> dst in every layer, for each (src, dst)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.data.device)
        dst = torch.tensor([d for _, d in pairs], device=self.data.device)
        for t in self._tensors():
            t[:, :, dst] = t[:, :, src]

    def swap_out(self, block_ids: list[int]) -> HostKV:
        """A host-memory copy of these blocks (all layers)."""
        idx = torch.tensor(block_ids, device=self.data.device)
        data, *scales = (t[:, :, idx].to("cpu", copy=True) for t in self._tensors())
        return HostKV(data, scales[0] if scales else None)

    def swap_in(self, host: HostKV, block_ids: list[int]) -> None:
        idx = torch.tensor(block_ids, device=self.data.device)
        self.data[:, :, idx] = host.data.to(self.data.device)
        if self.scales is not None:
            self.scales[:, :, idx] = host.scales.to(self.data.device)

    @property
    def num_blocks(self) -> int:
        return self.data.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def bytes_per_block(self) -> int:
        return self.nbytes // self.num_blocks
