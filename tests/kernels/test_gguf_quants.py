"""The torch reference of GGUF weights means what the gguf package's numpy `dequantize` says, bit
for bit, for every type chatpager runs: on random valid blocks of odd shapes (one row, odd row
counts, one block and several per row, rows of 32-weight blocks that are not a multiple of 256),
in the decoding chunks' seams, and on the default model's file. The torch matmul fallback is
x @ w.T up to float32 summation; Q8_0 quantization writes gguf's bytes."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from chatpager.engine.model.loader import default_gguf_path
from chatpager.kernels import gguf_quants
from chatpager.kernels.gguf_quants import (
    BLOCKS,
    TYPE_IDS,
    GGUFMatrix,
    dequantize,
    dequantize_rows,
    matmul_torch,
    quantize_q8_0,
)
from tests.kernels.gguf_blocks import oracle, random_matrix

TYPES = list(BLOCKS)
NAMES = [BLOCKS[t][0] for t in TYPES]
U = 2.0 ** -24  # float32's unit roundoff


def shapes(type_id: int) -> list[tuple[int, int]]:
    """(rows, cols): one row of one block, odd row counts, several blocks per row."""
    block = BLOCKS[type_id][1]
    if block == 1:
        return [(1, 1), (3, 7), (17, 96)]
    if block == 32:  # 5 and 9 blocks: rows that K-quants could not hold
        return [(1, 32), (3, 160), (17, 288), (4, 512)]
    return [(1, 256), (3, 768), (17, 512)]


CASES = [(t, r, c) for t in TYPES for r, c in shapes(t)]


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    same = got.view(torch.int32) == want.view(torch.int32)
    assert same.all(), f"{int((~same).sum())} of {same.numel()} differ, first at {(~same).nonzero()[0].tolist()}"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("type_id,rows,cols", CASES, ids=[f"{BLOCKS[t][0]}-{r}x{c}" for t, r, c in CASES])
def test_dequantize_is_the_oracle_bit_for_bit(type_id, rows, cols):
    m = random_matrix(type_id, rows, cols, generator(rows * 1000 + cols))
    assert_same_bits(dequantize(m), oracle(m))


@pytest.mark.parametrize("type_id", TYPES, ids=NAMES)
def test_chunk_seams_change_nothing(type_id, monkeypatch):
    """Decoded 2.5 rows' worth at a time (so 2 rows, then the odd one), and over the default chunks."""
    cols = 4 * BLOCKS[type_id][1] if BLOCKS[type_id][1] > 1 else 96
    m = random_matrix(type_id, 7, cols, generator(1))
    want = oracle(m)
    monkeypatch.setattr(gguf_quants, "CHUNK_WEIGHTS", cols * 5 // 2)
    assert_same_bits(dequantize(m), want)
    monkeypatch.setattr(gguf_quants, "CHUNK_WEIGHTS", 1)  # less than a row: one row at a time
    assert_same_bits(dequantize(m), want)
    monkeypatch.undo()
    big = random_matrix(type_id, 300, 1024, generator(2))  # 300K weights: two default chunks
    assert_same_bits(dequantize(big), oracle(big))


@pytest.mark.parametrize("type_id", [TYPE_IDS["Q4_K"], TYPE_IDS["Q8_0"], TYPE_IDS["F16"]], ids=["Q4_K", "Q8_0", "F16"])
def test_dequantize_to_another_dtype_rounds_the_float32_values(type_id):
    m = random_matrix(type_id, 5, 256, generator(3))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        got = dequantize(m, dtype)
        assert got.dtype == dtype and torch.equal(got, oracle(m).to(dtype))


def test_f32_is_a_view_of_the_stored_bytes():
    m = random_matrix(TYPE_IDS["F32"], 3, 7, generator(4))
    assert dequantize(m).data_ptr() == m.data.data_ptr()


@pytest.mark.parametrize("type_id", [TYPE_IDS["F32"], TYPE_IDS["Q4_K"], TYPE_IDS["Q5_0"]], ids=["F32", "Q4_K", "Q5_0"])
def test_blocks_at_an_odd_address_decode_the_same(type_id):
    """Bytes after a 1-byte header, as a mapped file might place them: no aligned views there."""
    m = random_matrix(type_id, 3, 256, generator(13))
    shifted = torch.empty(m.nbytes + 1, dtype=torch.uint8)[1:].view(m.rows, -1)
    shifted.copy_(m.data)
    assert_same_bits(dequantize(GGUFMatrix(type_id, shifted, m.rows, m.cols)), oracle(m))


@pytest.mark.parametrize("type_id", TYPES, ids=NAMES)
def test_dequantize_rows_is_the_oracles_rows(type_id):
    block = BLOCKS[type_id][1]
    m = random_matrix(type_id, 11, 2 * block if block > 1 else 40, generator(5))
    want = oracle(m)
    for index in (torch.tensor([3, 0, 3, 10]), torch.tensor([[1, 2], [9, 9]]), torch.tensor([7])):
        got = dequantize_rows(m, index)
        assert got.shape == (*index.shape, m.cols)
        assert_same_bits(got.reshape(-1, m.cols), want[index.reshape(-1)])


def matmul_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Float32 products and sums of K terms, in any order, stay within K u sum |x| |w| (+ a hair)."""
    return 1.01 * x.shape[1] * U * (x.abs().double() @ w.abs().double().T)


@pytest.mark.parametrize("m_rows", [1, 5, 16, 64])
@pytest.mark.parametrize("type_id", TYPES, ids=NAMES)
def test_matmul_torch_is_x_times_the_oracle(type_id, m_rows, monkeypatch):
    block = BLOCKS[type_id][1]
    cols = {1: 96, 32: 160, 256: 512}[block]
    m = random_matrix(type_id, 37, cols, generator(6))
    w = oracle(m)
    x = torch.randn(m_rows, cols, generator=generator(7))
    monkeypatch.setattr(gguf_quants, "CHUNK_WEIGHTS", 3 * cols + 1)  # 13 chunks of 3 rows, the last of 1
    got = matmul_torch(x, m)
    assert got.shape == (m_rows, 37) and got.dtype == torch.float32
    err = (got.double() - x.double() @ w.double().T).abs()
    assert (err <= matmul_bound(x, w)).all(), f"max error {err.max().item():.3g}"


def test_matmul_torch_adds_the_bias_and_takes_the_activations_dtype():
    m = random_matrix(TYPE_IDS["Q6_K"], 300, 1024, generator(8))  # two default chunks
    w = oracle(m)
    x = torch.randn(5, 1024, generator=generator(9))
    bias = torch.randn(300, generator=generator(10))
    want = x.double() @ w.double().T + bias.double()
    err = (matmul_torch(x, m, bias).double() - want).abs()
    assert (err <= matmul_bound(x, w) + 2 * U * want.abs()).all()
    half = matmul_torch(x.bfloat16(), m)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), x.double() @ w.double().T, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_matmul_torch_refuses_activations_of_another_width():
    m = random_matrix(TYPE_IDS["Q4_0"], 4, 64, generator(11))
    with pytest.raises(ValueError, match=r"x must be \[M, 64\] for a Q4_0 \[4, 64\] matrix, got \[2, 32\]"):
        matmul_torch(torch.zeros(2, 32), m)


def q8_0_test_weights() -> list[torch.Tensor]:
    g = generator(12)
    # d = 1: exact halves go away from zero; just under a half goes down (w + 0.5 would round to 1)
    under_half = float(np.nextafter(np.float32(0.5), np.float32(0)))
    ties = torch.tensor([127.0, 0.5, -0.5, 1.5, -2.5, 126.5, -126.5, under_half, -under_half] + [3.0] * 23)
    zeros = torch.zeros(32)
    wide = torch.randn(64, 576, generator=g) * torch.logspace(-4, 1, 576)  # every magnitude of scale
    return [torch.cat([ties, zeros, torch.randn(32, generator=g)]).view(1, 96),
            torch.randn(5, 96, generator=g), wide, wide.bfloat16()]


@pytest.mark.parametrize("case", range(4), ids=["ties-zeros", "5x96", "64x576", "bf16"])
def test_quantize_q8_0_writes_ggufs_bytes_and_round_trips_within_half_a_step(case):
    w = q8_0_test_weights()[case]
    m = quantize_q8_0(w)
    assert (m.type_id, m.rows, m.cols) == (TYPE_IDS["Q8_0"], *w.shape)
    want = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(m.data.numpy(), want)
    # the codes are round(w / d) for the float32 d; the stored step is d in float16, which moves a
    # code of up to 127 by 127 |d16 - d|
    groups = w.double().view(-1, 32)
    d = (groups.abs().amax(1, keepdim=True).float() / 127).double()
    d16 = d.half().double()
    err = (dequantize(m).double().view(-1, 32) - groups).abs()
    assert (err <= d / 2 * (1 + 1e-6) + 127 * (d16 - d).abs()).all()
    if case == 0:  # as in llama.cpp
        assert m.data[0, 2:11].view(torch.int8).tolist() == [127, 1, -1, 2, -3, 127, -127, 0, 0]


def test_quantize_q8_0_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match=r"Q8_0 needs a matrix \[N, K\] with K a multiple of 32, got \[4, 40\]"):
        quantize_q8_0(torch.zeros(4, 40))


def test_a_matrix_refuses_an_unknown_type_a_partial_block_and_wrong_bytes():
    with pytest.raises(ValueError, match="unsupported GGUF tensor type 99"):
        GGUFMatrix(99, torch.zeros(2, 18, dtype=torch.uint8), 2, 32)
    with pytest.raises(ValueError, match="Q4_K needs a row length that is a multiple of 256, got 288"):
        GGUFMatrix(TYPE_IDS["Q4_K"], torch.zeros(2, 162, dtype=torch.uint8), 2, 288)
    with pytest.raises(ValueError, match=r"Q4_0 \[2, 64\] needs uint8 data of shape \[2, 36\], got torch.uint8 \[2, 35\]"):
        GGUFMatrix(TYPE_IDS["Q4_0"], torch.zeros(2, 35, dtype=torch.uint8), 2, 64)
    with pytest.raises(ValueError, match=r"needs uint8 data of shape \[2, 36\], got torch.float32 \[2, 36\]"):
        GGUFMatrix(TYPE_IDS["Q4_0"], torch.zeros(2, 36), 2, 64)
    with pytest.raises(ValueError, match=r"needs uint8 data of shape \[2, 36\], got torch.uint8 \[72\]"):
        GGUFMatrix(TYPE_IDS["Q4_0"], torch.zeros(72, dtype=torch.uint8), 2, 64)


def test_the_default_models_file_dequantizes_as_the_oracle_says():
    """Every tensor of SmolLM2-135M's GGUF (Q4_1 layers, a Q8_0 embedding, F32 norms)."""
    reader = gguf.GGUFReader(default_gguf_path())
    seen = set()
    for tensor in reader.tensors:
        cols = int(tensor.shape[0])  # GGUF lists dimensions innermost first
        raw = np.array(tensor.data).view(np.uint8).reshape(int(tensor.n_elements) // cols, -1)
        m = GGUFMatrix(int(tensor.tensor_type), torch.from_numpy(raw), raw.shape[0], cols)
        assert_same_bits(dequantize(m), oracle(m))
        seen.add(m.name)
    assert seen == {"Q4_1", "Q8_0", "F32"}
