"""Quantized KV cache (int8 / fp8 codes with a scale per token and head; int8 in a rotated
basis): the codes, both backends against the float reference, block copies and swaps carrying
the scales, the pool size, and the engine's outputs and quality against the full-precision cache."""
from __future__ import annotations

import pytest
import torch

from chatpager.kernels.kv_quant_torch import (dequantize, kv_rotation, paged_attention_quant_torch, quantize,
                                              write_kv_quant_torch)
from chatpager.kernels.paged_attention_torch import paged_attention_torch
from chatpager.kernels.triton_env import import_triton
from chatpager.kernels.write_kv_torch import write_kv_torch

import_triton()  # before the kernels are imported: interpreter on when there is no GPU

from chatpager.kernels import paged_attention_triton, write_kv_triton  # noqa: E402

QUANT = [torch.int8, torch.float8_e4m3fn]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", QUANT, ids=str)
def test_codes_round_trip_within_half_a_step(dtype: torch.dtype) -> None:
    x = torch.randn(64, 3, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 64)[:, None, None]
    x[0, 0] = 0.0  # a constant head stays what it is
    x[1] += 5.0  # off-centre heads use the whole code range too
    codes, meta = quantize(x, dtype)
    assert codes.dtype == dtype and meta.shape == (*x.shape[:-1], 2)
    back = dequantize(codes, meta, torch.float32)
    scale, offset = meta[..., :1], meta[..., 1:]
    # int8: half a step; e4m3: 3 mantissa bits, half an ulp is 1/16 of |x - offset|, plus
    # half the subnormal step near the offset
    bound = scale / 2 if dtype == torch.int8 else (x - offset).abs() / 16 + scale * 2**-10
    assert bool((back - x).abs().le(bound * 1.001 + 1e-6 * x.abs()).all())
    assert torch.allclose(back[0, 0], torch.zeros(32), atol=1e-9)
    if dtype == torch.int8:  # the range's ends come back (up to float rounding)
        for end in (torch.amax, torch.amin):
            torch.testing.assert_close(end(back, -1), end(x, -1), rtol=1e-5, atol=1e-6)
    else:  # symmetric: the largest magnitude does
        torch.testing.assert_close(back.abs().amax(-1), x.abs().amax(-1), rtol=1e-5, atol=1e-6)


def _random_cache(dtype: torch.dtype, num_blocks: int, block_size: int, kv: int, d: int, seed: int = 0):
    """A cache filled through the torch write, so codes and scales are consistent."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(num_blocks, block_size, kv, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k_scale = torch.zeros(num_blocks, block_size, kv, 2)
    v_scale = torch.ones_like(k_scale)
    n = num_blocks * block_size
    write_kv_quant_torch(torch.randn(n, kv, d, generator=gen) * 3, torch.randn(n, kv, d, generator=gen),
                         k_cache, v_cache, torch.arange(n), k_scale, v_scale)
    return k_cache, v_cache, k_scale, v_scale


def _batch(block_size: int, seed: int = 1):
    """Three sequences: a decode, a prefill chunk on a cached prefix, a whole prompt; the second
    shares the first's leading 32 tokens of blocks (a fork). Tables point at shuffled blocks.
    Returns (tables, seq_lens, query_start_loc, num_tokens, num_blocks)."""
    seq_lens, q_lens = [40, 37, 9], [1, 6, 9]
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 2
    free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [[free.pop() for _ in range(n)] for n in need]
    shared = 32 // block_size
    rows[1][:shared] = rows[0][:shared]
    tables = torch.zeros(3, max(need), dtype=torch.int32)
    for i, row in enumerate(rows):
        tables[i, :len(row)] = torch.tensor(row)
    starts = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    return tables, torch.tensor(seq_lens, dtype=torch.int32), starts, sum(q_lens), num_blocks


@pytest.mark.parametrize("dtype", QUANT, ids=str)
def test_torch_quantized_attention_is_the_reference_over_dequantized_kv(dtype: torch.dtype) -> None:
    tables, seq_lens, starts, n, num_blocks = _batch(16)
    k_cache, v_cache, k_scale, v_scale = _random_cache(dtype, num_blocks, 16, 2, 32)
    q = torch.randn(n, 6, 32, generator=torch.Generator().manual_seed(2))
    out = paged_attention_quant_torch(q, k_cache, v_cache, tables, seq_lens, starts, 0.2,
                                      k_scale=k_scale, v_scale=v_scale)
    ref = paged_attention_torch(q, dequantize(k_cache, k_scale, torch.float32),
                                dequantize(v_cache, v_scale, torch.float32), tables, seq_lens, starts, 0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", QUANT, ids=str)
def test_triton_writes_the_same_codes_and_attends_like_the_reference(dtype: torch.dtype) -> None:
    """Interpreter on CPU: small shapes, one mixed batch per format."""
    gen = torch.Generator().manual_seed(3)
    block_size, kv, d = 8, 2, 32
    tables, seq_lens, starts, n, num_blocks = _batch(block_size)
    k_ref, v_ref, ks_ref, vs_ref = _random_cache(dtype, num_blocks, block_size, kv, d)
    k_tri, v_tri, ks_tri, vs_tri = (t.clone() for t in (k_ref, v_ref, ks_ref, vs_ref))
    new_k, new_v = torch.randn(10, kv, d, generator=gen) * 5, torch.randn(10, kv, d, generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:10]
    slots[3] = -1  # a skipped token
    write_kv_quant_torch(new_k, new_v, k_ref, v_ref, slots, ks_ref, vs_ref)
    write_kv_triton(new_k, new_v, k_tri, v_tri, slots, k_scale=ks_tri, v_scale=vs_tri)
    assert torch.equal(k_tri.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_tri.view(torch.uint8), v_ref.view(torch.uint8))
    assert torch.equal(ks_tri, ks_ref) and torch.equal(vs_tri, vs_ref)

    q = torch.randn(n, 4, d, generator=gen)
    out = paged_attention_triton(q, k_tri, v_tri, tables, seq_lens, starts, 0.2, num_splits=1,
                                 k_scale=ks_tri, v_scale=vs_tri)
    ref = paged_attention_quant_torch(q, k_ref, v_ref, tables, seq_lens, starts, 0.2, k_scale=ks_ref, v_scale=vs_ref)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_kernels_refuse_a_quantized_cache_without_scales() -> None:
    k_cache = torch.zeros(2, 4, 1, 16, dtype=torch.int8)
    q, one = torch.randn(1, 1, 16), torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match="k_scale"):
        paged_attention_triton(q, k_cache, k_cache, torch.zeros(1, 1, dtype=torch.int32), one,
                               torch.tensor([0, 1], dtype=torch.int32), 0.25)
    with pytest.raises(ValueError, match="k_scale"):
        write_kv_triton(torch.randn(1, 1, 16), torch.randn(1, 1, 16), k_cache, k_cache, torch.tensor([0]))


@pytest.mark.parametrize("head_dim", [64, 96, 5])
def test_kv_rotation_is_orthogonal_and_its_own_inverse(head_dim: int) -> None:
    r = kv_rotation(head_dim, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(r @ r, torch.eye(head_dim), atol=1e-6, rtol=0)
    assert torch.equal(r, r.T)
    block = head_dim & -head_dim  # Hadamard blocks of the largest power of two dividing head_dim
    for i in range(0, head_dim, block):  # every entry of a block is +-1/sqrt(block): outliers spread evenly
        assert torch.allclose(r[i:i + block, i:i + block].abs(), torch.full((block, block), block ** -0.5))
    assert int(r.count_nonzero()) == head_dim * block


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_int8_cache_holds_rotated_kv_and_outlier_channels_cost_less(backend: str) -> None:
    """Through the engine's backend (both kinds): the cache holds codes of k R, the output is
    rotated back, and with an outlier channel in K (as after RoPE in small models) the result
    is closer to float attention than per-token codes of the unrotated K."""
    from chatpager.engine.model.attention import AttentionMetadata, select_backend

    gen = torch.Generator().manual_seed(7)
    block_size, kv, heads, d, lens = 8, 2, 4, 32, [13, 6]
    tables = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)  # shuffled blocks, one prefill each
    slots = torch.cat([tables[i, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
                       for i, n in enumerate(lens)])
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=torch.tensor(lens, dtype=torch.int32),
                             query_start_loc=torch.tensor([0, 13, 19], dtype=torch.int32))
    q, k, v = (torch.randn(19, h, d, generator=gen) for h in (heads, kv, kv))
    k[..., 5] += 12.0  # outlier channels, as the slow RoPE pairs are in K
    v[..., 9] -= 6.0
    codes = torch.zeros(2, 4, block_size, kv, d, dtype=torch.int8)
    scales = torch.zeros(2, 4, block_size, kv, 2)
    attend = select_backend(backend, torch.device("cpu"), kv_quantized=True)
    out = attend(q, k, v, codes[0], codes[1], meta, 0.2, scales=(scales[0], scales[1]))

    r = kv_rotation(d, torch.float32, torch.device("cpu"))
    stored = dequantize(codes[0], scales[0], torch.float32).view(-1, kv, d)[slots]
    torch.testing.assert_close(stored @ r, k, atol=0.1, rtol=0)  # int8 steps of a ~15-wide range
    exact = torch.zeros(2, 4, block_size, kv, d)
    write_kv_torch(k, v, exact[0], exact[1], slots)
    want = paged_attention_torch(q, exact[0], exact[1], tables, meta.seq_lens, meta.query_start_loc, 0.2)
    plain_codes, plain_scales = torch.zeros_like(codes), torch.zeros_like(scales)  # the same codes, unrotated
    write_kv_quant_torch(k, v, plain_codes[0], plain_codes[1], slots, plain_scales[0], plain_scales[1])
    plain = paged_attention_quant_torch(q, plain_codes[0], plain_codes[1], tables, meta.seq_lens,
                                        meta.query_start_loc, 0.2, k_scale=plain_scales[0], v_scale=plain_scales[1])
    err, plain_err = (out - want).norm(), (plain - want).norm()
    # the rotated range is ~0.6x the unrotated one here (outlier 12 spread over 32 channels)
    assert err < 0.01 * want.norm() and err < 0.7 * plain_err, (float(err), float(plain_err))


def test_block_copy_and_swap_move_the_scales_with_the_codes() -> None:
    from chatpager.engine.model.kv_cache import KVCache

    kv = KVCache(2, 6, 4, 1, 8, torch.int8, torch.device("cpu"), scaled=True)
    kv.data.random_(-100, 100)
    kv.scales.uniform_(0.1, 2.0)
    before = dequantize(kv.data[:, :, 1], kv.scales[:, :, 1], torch.float32)
    kv.copy_blocks([(1, 4)])
    assert torch.equal(dequantize(kv.data[:, :, 4], kv.scales[:, :, 4], torch.float32), before)
    host = kv.swap_out([1, 2])
    kv.data.zero_()
    kv.scales.fill_(1.0)
    kv.swap_in(host, [5, 0])
    assert torch.equal(dequantize(kv.data[:, :, 5], kv.scales[:, :, 5], torch.float32), before)
    assert kv.bytes_per_block == 2 * 2 * 4 * (8 + 8)  # layers * K/V * slots * (codes + scale, offset)


# --- the engine ------------------------------------------------------------------------------

GREEDY = dict(temperature=0.0)


def test_pool_holds_more_blocks_and_reports_its_format(tiny_llama):
    from chatpager import LLM

    sizes = {}
    for dtype in ("float32", "bfloat16", "int8", "fp8"):
        llm = LLM(tiny_llama, kv_cache_memory=2**20, kv_cache_dtype=dtype)
        info = llm.model_info
        assert info["kv_cache_dtype"] == dtype
        assert info["kv_bytes_per_block"] == llm.engine.runner.kv_cache.bytes_per_block
        assert llm.engine.pool.num_blocks * info["kv_bytes_per_block"] <= 2**20
        sizes[dtype] = llm.engine.pool.num_blocks
    cfg = llm.model.config
    ratio = (4 * cfg.head_dim) / (cfg.head_dim + 8)  # fp32 vs one-byte codes + float32 (scale, offset)
    assert sizes["bfloat16"] == 2 * sizes["float32"]
    assert sizes["int8"] == sizes["fp8"] == pytest.approx(ratio * sizes["float32"], rel=0.01)
    assert LLM(tiny_llama, num_blocks=4).model_info["kv_cache_dtype"] == "float32"  # auto: the model's dtype
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(tiny_llama, kv_cache_dtype="int4")


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_swap_and_fork_keep_quantized_kv_intact(kv_cache_dtype, tiny_llama):
    """Preemption by swap moves codes and scales out and back; forks share them and CoW copies
    them: the tokens equal those of a pool that never runs short."""
    from chatpager import LLM, SamplingParams

    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (25, 30, 40, 28, 33)]
    params = SamplingParams(max_tokens=24, ignore_eos=True, n=2, **GREEDY)
    roomy = LLM(tiny_llama, kv_cache_dtype=kv_cache_dtype, num_blocks=256, block_size=4)
    tight = LLM(tiny_llama, kv_cache_dtype=kv_cache_dtype, num_blocks=24, block_size=4, preemption_mode="swap")
    expect = [[s.token_ids for s in o.samples] for o in roomy.generate(prompts, params)]
    got = [[s.token_ids for s in o.samples] for o in tight.generate(prompts, params)]
    assert got == expect
    stats = tight.stats()
    assert stats["swap_outs"] > 0 and stats["cow_copies"] > 0


# Quality against the fp32 cache over the ~2,300-token quality text, teacher-forced: top-1
# agreement and the perplexity change, figures that average over every position. Measured on
# the default model (float32 weights; AMD EPYC, 2026-12-04): int8 (rotated basis) 99.27 %,
# +0.01 %; fp8 96.39 %, +0.11 %. Both move with float rounding, which another CPU does in
# other ways: a value near a code boundary changes code for a last-bit change, so quantized
# caches amplify rounding where the fp32 cache does not. Over 27 runs with every RMSNorm
# weight scaled by 1 + 2^-21 or 2^-18 times noise (`python -m chatpager.bench.quality
# --kv-cache-dtype X --rounding-noise 4.8e-7`, and 3.8e-6, 6 runs each; 15 more with other
# seeds), which moves the fp32 logits by ~1.3e-4, 2-4x as much as this engine's differ from
# transformers', int8 spread over 99.06-99.61 % and -0.09 to +0.06 %, fp8 over 95.84-96.87 %
# and +0.14 to +0.67 %; int8's lowest was one token above its old 99 % floor. Each bound below
# sits at least 3x the largest move toward it away from the measured value; a broken cache
# (scales zeroed) lands far outside (under 1 % agreement). Greedy replies equal to the fp32
# cache's are not asserted: one near-tie flipped by rounding changes the rest of a reply (int8
# kept 5 of 6 here, 4 of 6 on an Intel Xeon); the benchmark measures and reports them.
MIN_AGREEMENT = {"int8": 0.985, "fp8": 0.945}
MAX_PERPLEXITY_CHANGE = {"int8": 0.003, "fp8": 0.02}


@pytest.fixture(scope="module")
def fp32_reference(default_llm):
    """The quality text's documents and what the fp32 cache predicts over them (teacher-forced
    picks, negative log-likelihood), once for both formats."""
    from chatpager.bench.quality import documents, predictions

    docs = documents(default_llm.tokenizer)
    return docs, predictions(default_llm.model, docs, "float32")


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_default_model_quality_with_a_quantized_cache(kv_cache_dtype, fp32_reference, default_llm):
    """Teacher-forced next-token agreement with the fp32 cache and the perplexity change over a
    fixed ~2,300-token text (one prefill per document, no second engine)."""
    from chatpager.bench.quality import predictions, quality

    docs, reference = fp32_reference
    result = quality(*predictions(default_llm.model, docs, kv_cache_dtype), *reference)
    print(f"{kv_cache_dtype}: {result.line()}")
    assert result.tokens >= 2000
    assert result.agreement >= MIN_AGREEMENT[kv_cache_dtype], result.line()
    assert abs(result.perplexity_change) <= MAX_PERPLEXITY_CHANGE[kv_cache_dtype], result.line()


def test_the_benchmark_finds_where_a_reply_stops_being_greedy(tiny_llama):
    """`chatpager.bench.quality`'s greedy-reply count rests on `first_miss`: None for a reply the
    cache would produce itself, else the first position it would not; `jittered_norms` (its
    rounding-noise runs) puts the model's weights back."""
    from chatpager import LLM, SamplingParams
    from chatpager.bench.quality import first_miss, jittered_norms

    llm = LLM(tiny_llama, num_blocks=64)
    prompt = list(range(40, 60))
    # its two best logits are >= 0.13 apart along this reply: prefill and decode pick alike
    reply = list(llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True, **GREEDY))[0].token_ids)
    assert first_miss(llm.model, prompt, reply, "float32") is None
    assert first_miss(llm.model, prompt, reply[:3] + [(reply[3] + 1) % 250] + reply[4:], "float32") == 3
    norms = [layer.input_norm for layer in llm.model.layers]
    with jittered_norms(llm.model, 2**-21, seed=0):
        assert not torch.equal(llm.model.layers[0].input_norm, norms[0])
    assert all(layer.input_norm is w for layer, w in zip(llm.model.layers, norms))


def test_kv_cache_dtype_is_an_engine_option():
    import argparse

    from chatpager.engine_args import add_engine_args, EngineArgs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = EngineArgs.from_namespace(parser.parse_args(["--kv-cache-dtype", "int8"]))
    assert args.llm_kwargs()["kv_cache_dtype"] == "int8"
    assert EngineArgs.from_namespace(parser.parse_args([])).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int4"])
