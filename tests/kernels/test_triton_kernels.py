"""The Triton kernels against the torch reference, and the reference against a dense oracle.

Without a GPU the Triton kernels run under Triton's interpreter (switched on by
`import_triton` before the kernels are imported), so shapes here are small and the parameter
grid is a hand-picked list of cases rather than a full cartesian product.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from chatpager.kernels.triton_env import import_triton, interpreting

import_triton()  # before the kernels are imported: interpreter on when there is no GPU

from chatpager.kernels import (  # noqa: E402
    paged_attention_torch, paged_attention_triton, triton_available, write_kv_torch, write_kv_triton)

pat_module = importlib.import_module("chatpager.kernels.paged_attention_triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# |out| is a convex mix of N(0, 1) values; these cover each dtype's rounding of it.
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    q_lens: tuple[int, ...]  # new tokens per sequence this step
    seq_lens: tuple[int, ...]  # context length per sequence after this step
    block_size: int = 16
    heads: tuple[int, int] = (8, 2)  # (query heads, kv heads)
    head_dim: int = 64
    dtype: torch.dtype = torch.float32
    shared: bool = False  # later sequences share the first sequence's leading blocks (a fork)
    pad: int = -1  # value of unused block-table entries
    num_splits: int | None = 1

    def __str__(self) -> str:
        h, kv = self.heads
        dt = str(self.dtype).removeprefix("torch.")
        return (f"q{'-'.join(map(str, self.q_lens))}_ctx{'-'.join(map(str, self.seq_lens))}_bs{self.block_size}"
                f"_h{h}kv{kv}_d{self.head_dim}_{dt}{'_shared' if self.shared else ''}_split{self.num_splits}")


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc,
                self.scale)


def make_batch(case: Case, seed: int = 0) -> Batch:
    """Random caches whose blocks are handed out in shuffled order (and shared if asked)."""
    gen = torch.Generator().manual_seed(seed)
    bs = case.block_size
    num_heads, num_kv_heads = case.heads
    need = [-(-n // bs) for n in case.seq_lens]
    num_blocks = sum(need) + 3  # a few blocks that no table points at
    free = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(need), max(need) + 1), case.pad, dtype=torch.int32)
    for i, n in enumerate(need):
        shared = min(n, need[0]) - 1 if case.shared and i > 0 else 0
        table[i, :shared] = table[0, :shared]
        table[i, shared:n] = torch.tensor([free.pop() for _ in range(n - shared)], dtype=torch.int32)
    shape = (num_blocks, bs, num_kv_heads, case.head_dim)
    q = torch.randn(sum(case.q_lens), num_heads, case.head_dim, generator=gen)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    starts = torch.tensor([0, *case.q_lens]).cumsum(0).to(torch.int32)
    return Batch(q.to(DEVICE, case.dtype), k_cache.to(DEVICE, case.dtype), v_cache.to(DEVICE, case.dtype),
                 table.to(DEVICE), torch.tensor(case.seq_lens, dtype=torch.int32, device=DEVICE), starts.to(DEVICE),
                 case.head_dim ** -0.5)


def dense_attention(b: Batch) -> torch.Tensor:
    """Oracle: per sequence, gather K/V position by position and run plain causal softmax (fp64)."""
    num_heads, num_kv_heads = b.q.shape[1], b.k_cache.shape[2]
    block_size = b.k_cache.shape[1]
    out = torch.empty(b.q.shape, dtype=torch.float64)
    for i, seq_len in enumerate(b.seq_lens.tolist()):
        start, end = b.query_start_loc[i].item(), b.query_start_loc[i + 1].item()
        slots = [(b.block_tables[i, p // block_size].item(), p % block_size) for p in range(seq_len)]
        k = torch.stack([b.k_cache[blk, off] for blk, off in slots]).double().cpu()  # [L, kv, d]
        v = torch.stack([b.v_cache[blk, off] for blk, off in slots]).double().cpu()
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # query head h reads kv head h // group
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        q = b.q[start:end].double().cpu()
        scores = torch.einsum("qhd,khd->hqk", q, k) * b.scale
        q_pos = torch.arange(seq_len - (end - start), seq_len)
        scores.masked_fill_(torch.arange(seq_len)[None, :] > q_pos[:, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def reference(b: Batch) -> torch.Tensor:
    """The torch reference, computed in fp32 from the same (possibly half-precision) inputs."""
    f = [t.float() if t.is_floating_point() else t for t in b.args()[:-1]]
    return paged_attention_torch(*f, b.scale)


CASES = [
    # decode: ragged contexts, one query each, across GQA ratios 1/3/4/8 and block sizes 8/16/32
    Case((1, 1, 1, 1), (1, 17, 64, 130)),
    Case((1, 1, 1, 1), (1, 17, 64, 130), dtype=torch.float16, pad=0),
    Case((1, 1, 1), (33, 5, 96), block_size=8, heads=(4, 4), head_dim=128),
    Case((1, 1, 1), (70, 31, 2), block_size=32, heads=(24, 3), dtype=torch.float16),
    Case((1, 1), (45, 90), heads=(6, 2), shared=True),
    # prefill chunks on a cached prefix, whole prompts and decodes in one batch
    Case((1, 7, 20, 1), (40, 30, 20, 9)),
    Case((1, 7, 20, 1), (40, 30, 20, 9), dtype=torch.float16, shared=True),
    Case((33, 1, 12), (50, 77, 12), block_size=8, heads=(16, 2), head_dim=128),
    Case((5, 9), (60, 9), block_size=32, heads=(12, 4), head_dim=128, dtype=torch.float16, pad=0),
    Case((70,), (100,), heads=(4, 4)),  # several query blocks in one sequence
    # head dims that are not powers of two, tiny block sizes, bf16
    Case((1, 6), (23, 40), heads=(6, 2), head_dim=80),
    Case((1, 1, 4), (50, 3, 19), block_size=8, heads=(4, 1), head_dim=96, dtype=torch.float16),
    Case((3, 1), (11, 20), block_size=1, heads=(4, 2)),
    Case((1, 4), (9, 14), block_size=2, heads=(6, 2), head_dim=80),
    Case((2, 1), (13, 7), block_size=4, heads=(8, 1)),
    Case((2, 5), (13, 29), block_size=3, heads=(6, 2)),  # not a power of two: works too
    Case((1, 5), (30, 40), heads=(8, 2), dtype=torch.bfloat16, shared=True),
    # split-KV forced on: decode and mixed batches, more splits than tiles, shared blocks
    Case((1, 1, 1), (130, 1, 64), num_splits=2),
    Case((1, 1, 1), (200, 40, 7), block_size=8, heads=(12, 4), dtype=torch.float16, num_splits=4),
    Case((1, 1), (150, 70), block_size=32, heads=(16, 2), head_dim=128, shared=True, num_splits=3),
    Case((1, 3), (60, 20), num_splits=8),
    Case((1, 1), (90, 17), heads=(4, 4), dtype=torch.bfloat16, num_splits=2),
]


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype == torch.float32], ids=str)
def test_torch_reference_matches_dense_oracle(case: Case) -> None:
    b = make_batch(case)
    torch.testing.assert_close(reference(b).double().cpu(), dense_attention(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case: Case) -> None:
    b = make_batch(case)
    out = paged_attention_triton(*b.args(), num_splits=case.num_splits)
    assert out.shape == b.q.shape and out.dtype == b.q.dtype
    atol = ATOL[case.dtype]
    torch.testing.assert_close(out.float(), reference(b), atol=atol, rtol=atol)
    torch.testing.assert_close(out.double().cpu(), dense_attention(b), atol=atol, rtol=atol)


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    group=st.sampled_from([1, 3, 4, 8]),
    block_size=st.sampled_from([1, 4, 8, 16, 32]),
    num_splits=st.sampled_from([1, 2]),
)
def test_triton_matches_reference_on_random_batches(data, group: int, block_size: int, num_splits: int) -> None:
    num_seqs = data.draw(st.integers(1, 3), label="num_seqs")
    seq_lens = data.draw(st.lists(st.integers(1, 80), min_size=num_seqs, max_size=num_seqs), label="seq_lens")
    q_lens = tuple(data.draw(st.integers(1, min(n, 12)), label="q_len") for n in seq_lens)
    case = Case(q_lens, tuple(seq_lens), block_size=block_size, heads=(2 * group, 2), head_dim=32,
                shared=data.draw(st.booleans(), label="shared"), num_splits=num_splits)
    b = make_batch(case, seed=data.draw(st.integers(0, 2**16), label="seed"))
    torch.testing.assert_close(paged_attention_triton(*b.args(), num_splits=num_splits), reference(b),
                               atol=ATOL[torch.float32], rtol=ATOL[torch.float32])


def test_writes_into_out_and_reads_strided_q() -> None:
    """The engine passes q as a view into its fused qkv projection and a preallocated out."""
    b = make_batch(Case((1, 6), (30, 6), heads=(4, 2), head_dim=32))
    qkv = torch.randn(b.q.shape[0], 8, 32, device=DEVICE)
    qkv[:, :4] = b.q
    b.q = qkv[:, :4]
    assert not b.q.is_contiguous()
    out = torch.full_like(qkv[:, :4], float("nan"))
    assert paged_attention_triton(*b.args(), out=out) is out
    torch.testing.assert_close(out, reference(b), atol=ATOL[torch.float32], rtol=ATOL[torch.float32])


def test_rejects_bad_inputs_with_clear_errors() -> None:
    b = make_batch(Case((1, 1), (5, 9)))
    with pytest.raises(ValueError, match="int32"):
        paged_attention_triton(b.q, b.k_cache, b.v_cache, b.block_tables.long(), b.seq_lens, b.query_start_loc, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_triton(b.q[:, :3], b.k_cache, b.v_cache, *b.args()[3:])
    with pytest.raises(ValueError, match="num_splits"):
        paged_attention_triton(*b.args(), num_splits=0)


def test_split_heuristic_splits_only_small_batches_with_long_contexts(monkeypatch) -> None:
    monkeypatch.setattr(pat_module, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert pat_module._choose_num_splits(num_programs=8, max_context=32768, device=cuda) > 1
    assert pat_module._choose_num_splits(num_programs=8 * 256, max_context=32768, device=cuda) == 1
    assert pat_module._choose_num_splits(num_programs=8, max_context=512, device=cuda) == 1
    assert pat_module._choose_num_splits(num_programs=8, max_context=32768, device=torch.device("cpu")) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_write_kv_triton_matches_torch(dtype: torch.dtype, block_size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    num_blocks, num_kv_heads, head_dim, num_tokens = 64 // block_size + 2, 3, 80, 20
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE)  # fp32 into a `dtype` cache
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::4] = -1  # skipped tokens
    slots = slots.to(DEVICE)
    k_ref = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    v_ref = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    k_tri, v_tri = k_ref.clone(), v_ref.clone()
    write_kv_torch(k, v, k_ref, v_ref, slots)
    write_kv_triton(k, v, k_tri, v_tri, slots)
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref)
    written = k_tri.view(-1, num_kv_heads, head_dim)[slots[slots >= 0]]
    assert torch.equal(written, k[slots >= 0].to(dtype))


def test_triton_is_available_here() -> None:
    assert triton_available()
    assert torch.cuda.is_available() or interpreting()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only switched on without a GPU")
def test_kernels_run_when_something_imported_triton_first() -> None:
    """transformers imports triton before chatpager can set TRITON_INTERPRET; that must not matter."""
    code = """
import triton, torch
from chatpager.kernels import paged_attention_torch, paged_attention_triton
q, k, v = torch.randn(3, 4, 16), torch.randn(4, 2, 2, 16), torch.randn(4, 2, 2, 16)
args = (q, k, v, torch.tensor([[3, 1]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
        torch.tensor([0, 3], dtype=torch.int32), 0.25)
torch.testing.assert_close(paged_attention_triton(*args), paged_attention_torch(*args))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


COMPILE_FOR_SM90 = """
import importlib, torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

pat = importlib.import_module("chatpager.kernels.paged_attention_triton")
wkv = importlib.import_module("chatpager.kernels.write_kv_triton")
TARGET = GPUTarget("cuda", 90, 32)
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}

def build(kernel, constexprs, ptr_types, num_warps=4):
    sig = {name: "constexpr" if name in constexprs else ptr_types.get(name, "fp32" if name == "qk_scale" else "i32")
           for name in kernel.arg_names}
    compile(ASTSource(kernel, sig, constexprs), target=TARGET, options=dict(num_warps=num_warps))

for tokens, seqs, heads, kv, dim, block, dtype, splits in [
    (8, 8, 32, 8, 128, 16, torch.bfloat16, 1), (8, 8, 32, 8, 128, 32, torch.bfloat16, 4),
    (300, 3, 16, 2, 128, 32, torch.float16, 1), (40, 2, 8, 8, 64, 1, torch.float32, 1),
    (4, 4, 12, 4, 80, 16, torch.bfloat16, 2),
]:
    q = torch.empty(tokens, heads, dim, dtype=dtype, device="meta")
    cache = torch.empty(64, block, kv, dim, dtype=dtype, device="meta")
    plan = pat.plan_launch(q, cache, torch.empty(seqs, 8, dtype=torch.int32, device="meta"), splits)
    ptrs = dict.fromkeys(["out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr"], PTR[dtype])
    ptrs.update(dict.fromkeys(["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"], "*i32"))
    ptrs.update(dict.fromkeys(["part_out_ptr", "part_max_ptr", "part_sum_ptr"], "*fp32" if splits > 1 else PTR[dtype]))
    build(pat._paged_attention_kernel, {**plan.constexprs(), "SLIDING": False}, ptrs, plan.num_warps)
    if splits > 1:
        ptrs["out_ptr"] = PTR[dtype]
        build(pat._merge_splits_kernel, plan.merge_constexprs(), ptrs)
WRITE = dict(NUM_KV_HEADS=8, HEAD_DIM=80, HEADS_PAD=8, HEAD_DIM_PAD=128, BLOCK_SIZE=16, MIN_SCALE=1e-12)
build(wkv._write_kv_kernel, dict(WRITE, KV_QUANT=0, QMAX=1.0),
      {**dict.fromkeys(["k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr"], "*bf16"), "slot_mapping_ptr": "*i64"})
# quantized caches (int8 codes, fp8 codes passed as bytes) with a sliding window
for cache_dtype, code_ptr in ((torch.int8, "*i8"), (torch.float8_e4m3fn, "*u8")):
    q = torch.empty(8, 32, 80, dtype=torch.bfloat16, device="meta")
    cache = torch.empty(64, 16, 8, 80, dtype=cache_dtype, device="meta")
    plan = pat.plan_launch(q, cache, torch.empty(8, 8, dtype=torch.int32, device="meta"), 1)
    ptrs = {**dict.fromkeys(["out_ptr", "q_ptr", "part_out_ptr", "part_max_ptr", "part_sum_ptr"], "*bf16"),
            **dict.fromkeys(["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"], "*i32"),
            **dict.fromkeys(["k_cache_ptr", "v_cache_ptr"], code_ptr),
            **dict.fromkeys(["k_scale_ptr", "v_scale_ptr"], "*fp32")}
    build(pat._paged_attention_kernel, {**plan.constexprs(), "SLIDING": True}, ptrs, plan.num_warps)  # + a window
    build(wkv._write_kv_kernel, dict(WRITE, KV_QUANT=plan.kv_quant, QMAX=448.0),
          {**dict.fromkeys(["k_ptr", "v_ptr"], "*bf16"), **dict.fromkeys(["k_cache_ptr", "v_cache_ptr"], code_ptr),
           **dict.fromkeys(["k_scale_ptr", "v_scale_ptr"], "*fp32"), "slot_mapping_ptr": "*i64"})
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine compiles the kernels in the other tests")
def test_kernels_compile_for_a_gpu_target_without_a_gpu() -> None:
    """The interpreter never runs Triton's compiler; compiling for sm_90 here catches what only a
    GPU run would otherwise find (tl.dot shape limits, early returns, loop-carried types)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, check=True, timeout=300)


def test_kernel_bench_smoke_mode(tmp_path: Path, capsys, monkeypatch) -> None:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_bench.py"
    spec = importlib.util.spec_from_file_location("kernel_bench", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kernel_bench", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--interpret", "--tiny", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["triton_ms"] > 0 and r["sdpa_ms"] > 0 and r["max_abs_err"] < 5e-2 for r in rows)
    assert "ms" in capsys.readouterr().out
