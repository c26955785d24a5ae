"""Random valid GGUF blocks of every type in `BLOCKS`, and the gguf package's numpy meaning of
them, for tests of anything that reads GGUF weights (the torch reference, the C kernels, the
file reader).

Valid: every float in a block is finite and of a moderate size. Float types get Gaussian
weights; a quantized block is random bytes (every code, 6-bit packed scale and min, and int8
scale pattern is then reachable) whose float16 fields (`HALF_FIELDS`) are overwritten with
random halves of either sign, magnitudes between 2^-10 and 2^-4 (a weight of a K-quant then
stays below ~60; real files have smaller ones, which only makes the values closer together).
"""
from __future__ import annotations

import gguf
import numpy as np
import torch

from chatpager.kernels.gguf_quants import BLOCKS, GGUFMatrix

# type id -> byte offsets, inside a block, of its float16 fields (d, and m / dmin where it has one)
HALF_FIELDS: dict[int, tuple[int, ...]] = {
    2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,),  # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
    10: (80, 82), 11: (108,), 12: (0, 2), 13: (0, 2), 14: (208,),  # Q2_K Q3_K Q4_K Q5_K Q6_K
}
FLOAT_DTYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


def random_halves(n: int, generator: torch.Generator) -> torch.Tensor:
    """n float16 values of random sign, magnitude log-uniform in [2^-10, 2^-4]."""
    magnitude = torch.exp2(torch.empty(n).uniform_(-10, -4, generator=generator))
    sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    return (sign * magnitude).half()


def random_matrix(type_id: int, rows: int, cols: int, generator: torch.Generator) -> GGUFMatrix:
    """A rows x cols matrix of random valid blocks of `type_id`."""
    _, block, nbytes = BLOCKS[type_id]
    if type_id in FLOAT_DTYPES:
        w = torch.randn(rows, cols, generator=generator).to(FLOAT_DTYPES[type_id])
        return GGUFMatrix(type_id, w.view(torch.uint8), rows, cols)
    n = rows * cols // block
    blocks = torch.randint(0, 256, (n, nbytes), dtype=torch.uint8, generator=generator)
    for at in HALF_FIELDS[type_id]:
        blocks[:, at:at + 2] = random_halves(n, generator).view(torch.uint8).view(n, 2)
    return GGUFMatrix(type_id, blocks.view(rows, -1), rows, cols)


def oracle(m: GGUFMatrix) -> torch.Tensor:
    """What the gguf package says the blocks mean: float32 [rows, cols]."""
    w = gguf.quants.dequantize(m.data.numpy(), gguf.GGMLQuantizationType(m.type_id))
    return torch.from_numpy(np.array(w, dtype=np.float32)).reshape(m.rows, m.cols)  # a copy: F32 would alias
