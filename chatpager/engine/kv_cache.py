"""The K/V tensors of every layer, in fixed-size physical blocks.

One tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], so a block copy
(copy-on-write) or a swap moves one block of every layer in a single indexing op. This object
never decides who owns a block: the BlockPool does.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy block src -> dst in every layer, for each (src, dst)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.data.device)
        dst = torch.tensor([d for _, d in pairs], device=self.data.device)
        self.data[:, :, dst] = self.data[:, :, src]

    def swap_out(self, block_ids: list[int]) -> torch.Tensor:
        """A host-memory copy of these blocks (all layers)."""
        idx = torch.tensor(block_ids, device=self.data.device)
        return self.data[:, :, idx].to("cpu", copy=True)

    def swap_in(self, host: torch.Tensor, block_ids: list[int]) -> None:
        idx = torch.tensor(block_ids, device=self.data.device)
        self.data[:, :, idx] = host.to(self.data.device)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
