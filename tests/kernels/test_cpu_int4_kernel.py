"""The VNNI int4 kernel computes x @ w.T for grouped int4 weights up to the rounding of its
activations to two int8 digits, over the shapes the supported models have; it is built wherever
the CPU and a compiler allow, and without it int4 layers run torch's op."""
from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from chatpager.engine.model.gguf_weights import GroupedInt4
from chatpager.engine.model.quantization import int4_linear, Int4Linear
from chatpager.kernels import cpu_int4

needs_kernel = pytest.mark.skipif(not cpu_int4.available(), reason="the CPU lacks AVX512-VNNI or g++ is missing")


def test_the_kernel_is_built_wherever_the_cpu_and_a_compiler_allow():
    # the tests below skip without the kernel: this one fails instead if a build breaks
    switched_off = os.environ.get("CHATPAGER_CPU_INT4") == "0"  # as on a CPU without the instructions
    assert cpu_int4.available() == (cpu_int4._cpu_supports() and bool(shutil.which("g++")) and not switched_off)


def q4_1(n: int, k: int, seed: int = 0) -> GroupedInt4:
    """Random Q4_1-like weights whose scale and minimum are float16 values, as in a GGUF file."""
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02 + 0.001).half().float()
    minimum = (-8 * scale + torch.randn(n, k // 32, generator=g) * 0.005).half().float()
    return GroupedInt4(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g), scale, minimum)


FINE = 254  # the kernel's second activation digit counts steps of (max|x| / 127) / FINE


def two_digit_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it in the code term: per group of 32, s = max|x| / 127, a coarse digit
    round(x / s) and a fine one for what is left, in steps of s / FINE."""
    g = x.view(*x.shape[:-1], -1, 32)
    s = (g.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30)
    coarse = torch.round(g / s) * s
    return (coarse + torch.round((g - coarse) / (s / FINE)) * (s / FINE)).view_as(x)


def rounding_bound(x: torch.Tensor, w: GroupedInt4) -> torch.Tensor:
    """|error| per output when each activation may move by half its group's fine step, times |code * scale|."""
    step = x.view(x.shape[0], -1, 32).abs().amax(-1) / 127 / FINE  # [m, groups]
    code_mass = (w.codes.float() * w.scale.repeat_interleave(32, 1)).view(w.codes.shape[0], -1, 32).sum(-1)
    return step @ code_mass.T / 2  # [m, n]


# (n, k): SmolLM2-135M's qkv, o, gate_up and down (its head is 49152 x 576: more tiles of the same k),
# tiny models' and odd ones (n not a whole tile)
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (64, 64), (256, 128), (17, 96), (50, 32)]


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_kernel_matches_the_float_product_of_its_rounded_activations(m, n, k):
    w = q4_1(n, k, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(n)
    got = int4_linear(w, bias, kernel="vnni")(x)
    assert got.shape == (m, n) and got.dtype == torch.float32
    dense = w.dequantize().double()
    # the code term sees rounded activations, the minimum's term the exact ones
    minimum_term = x.double().view(m, -1, 32).sum(-1) @ w.minimum.double().T
    code_term = two_digit_rounded(x).double() @ (dense - w.minimum.double().repeat_interleave(32, 1)).T
    expected = code_term + minimum_term + bias.double()
    scale = (x.double().abs() @ dense.abs().T).max()
    assert (got.double() - expected).abs().max() <= 1e-5 * scale
    exact = x.double() @ dense.T + bias.double()
    assert ((got.double() - exact).abs() <= rounding_bound(x, w).double() + 1e-5 * scale).all()


@needs_kernel
def test_many_rows_cross_register_and_cache_blocks():
    w, x = q4_1(100, 128), torch.randn(300, 128)  # 300 rows: several 8-row blocks and two 256-row sweeps
    lin = int4_linear(w, kernel="vnni")
    row_by_row = torch.cat([lin(x[i:i + 1]) for i in range(300)])
    got = lin(x)
    torch.testing.assert_close(got, row_by_row, rtol=0, atol=0)  # each row's arithmetic is its own


@needs_kernel
def test_threads_split_the_work_without_changing_the_result():
    w, x = q4_1(3072, 576), torch.randn(24, 576)  # 42M multiply-adds: split whatever the OpenMP wait policy
    lin = int4_linear(w, kernel="vnni")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lin(x)
        torch.set_num_threads(2)
        two = lin(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
def test_other_dtypes_and_shapes_go_through_float32():
    w = q4_1(40, 64)
    lin = int4_linear(w, kernel="vnni")
    x = torch.randn(2, 3, 64).bfloat16()
    y = lin(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    assert torch.equal(y, lin(x.float().reshape(6, 64)).view(2, 3, 40).bfloat16())
    x = x.float()
    torch.testing.assert_close(lin(x.transpose(0, 1)), lin(x).transpose(0, 1))  # non-contiguous input
    with pytest.raises(ValueError, match="64"):
        lin(torch.randn(1, 96))


def test_scales_float16_cannot_hold_fall_back_to_torchs_op():
    w = q4_1(32, 64)
    w.scale[0, 0] = 1e6
    assert cpu_int4.pack(w.codes, w.scale, w.minimum) is None
    assert isinstance(int4_linear(w), Int4Linear)


def test_a_failed_build_falls_back_with_one_logged_line(broken_compiler, caplog):
    with caplog.at_level(logging.INFO, logger="chatpager.kernels.cpu_int4"):
        assert not cpu_int4.available()
        w, x = q4_1(48, 96), torch.randn(5, 96)
        lin = int4_linear(w)
        assert isinstance(lin, Int4Linear)  # torch's op, same weights
        assert (lin(x) - x @ w.dequantize().T).abs().max() <= 0.05 * (x @ w.dequantize().T).abs().max()
        with pytest.raises(RuntimeError, match="does not run here"):
            int4_linear(w, kernel="vnni")
    assert len([r for r in caplog.records if "torch's int4 op" in r.getMessage()]) == 1


@needs_kernel
def test_a_fresh_cache_builds_the_library_once(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATPAGER_CACHE_DIR", str(tmp_path))
    cpu_int4._library.cache_clear()
    try:
        assert cpu_int4.available()
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left beside it
        w, x = q4_1(20, 64), torch.randn(1, 64)
        assert (int4_linear(w, kernel="vnni")(x) - x @ w.dequantize().T).abs().max() < 0.05
    finally:
        cpu_int4._library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("m", [1, 7])
def test_rms_norm_fused_into_the_kernel_equals_norm_then_matmul(m):
    from chatpager.engine.model.decoder import normed_linear, rms_norm

    w, h, norm = q4_1(96, 576), torch.randn(m, 576) * 3, torch.rand(576) + 0.5
    lin = int4_linear(w, kernel="vnni")
    x, fused = normed_linear(lin, h, norm, 1e-5, keep_input=False)
    assert x is None  # the normed input is never made
    expected = lin(rms_norm(h, norm, 1e-5))
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    kept, unfused = normed_linear(lin, h, norm, 1e-5, keep_input=True)  # LoRA reads the input
    torch.testing.assert_close(kept, rms_norm(h, norm, 1e-5))
    assert torch.equal(unfused, expected)
    with pytest.raises(ValueError, match="float32"):
        lin.normed(h.bfloat16(), norm, 1e-5)


@needs_kernel
def test_swiglu_fused_into_the_kernel_equals_activation_then_matmul():
    from chatpager.engine.model.decoder import swiglu_linear

    w, gate_up = q4_1(64, 1536), torch.randn(3, 3072) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, -30.0, 30.0])  # the exponential's far ends
    lin = int4_linear(w, kernel="vnni")
    act, fused = swiglu_linear(lin, gate_up, keep_input=False)
    assert act is None
    gate, up = gate_up.chunk(2, dim=-1)
    expected = lin(torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    kept, unfused = swiglu_linear(lin, gate_up, keep_input=True)
    assert torch.equal(kept, torch.nn.functional.silu(gate) * up) and torch.equal(unfused, expected)
    with pytest.raises(ValueError, match="3072"):
        lin.swiglu(gate_up[:, :1536].contiguous())


@needs_kernel
def test_the_torch_profiler_names_the_kernel_calls():
    from torch.profiler import profile

    lin = int4_linear(q4_1(32, 64), kernel="vnni")
    with profile() as prof:
        lin(torch.randn(2, 64))
        lin.swiglu(torch.randn(2, 128))
    names = {e.key for e in prof.key_averages()}
    assert {"cpu_int4::mm", "cpu_int4::swiglu_mm"} <= names
