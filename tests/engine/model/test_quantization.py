"""Quantized linears compute what their weights say, "auto" picks the documented mode, and the
default model's fast path keeps its quality against the fp32 reference."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatpager import LLM, SamplingParams
from chatpager.bench.quality import compare, documents, prefill_hidden
from chatpager.engine.model.decoder import Model
from chatpager.engine.model.gguf_weights import GroupedInt4
from chatpager.engine.model.loader import load_state_dict
from chatpager.engine.model.quantization import (int4_linear, int8_linear, quantize_int4, resolve_quantization,
                                                 ShortlistHead)

CPU = torch.device("cpu")


def bf16_tolerance(x: torch.Tensor, w: torch.Tensor) -> float:
    """What rounding the activations and output to bf16 can cost on x @ w.T."""
    return float((x.abs() @ w.abs().T).max()) * 2 ** -7


def test_int4_linear_uses_the_codes_scale_and_minimum_exactly():
    torch.manual_seed(0)
    n, k = 48, 96
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = torch.rand(n, k // 32) * 0.05
    minimum = -8 * scale + torch.randn(n, k // 32) * 0.01
    w = GroupedInt4(codes, scale, minimum)
    x = torch.randn(5, k)
    expected = x @ w.dequantize().T
    got = int4_linear(w)(x)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= bf16_tolerance(x, w.dequantize())


def test_quantizing_floats_to_int4_and_int8_stays_close():
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    g = quantize_int4(w)
    step = (g.scale.max() / 2).item()  # rounding to the nearest code
    assert int(g.codes.max()) <= 15 and (g.dequantize() - w).abs().max() <= step + 1e-6
    x = torch.randn(3, 128)
    assert (int8_linear(w)(x) - x @ w.T).abs().max() <= bf16_tolerance(x, w) + 0.05 * (x @ w.T).abs().max()
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4(torch.randn(4, 40))


def test_shortlist_head_gives_exact_logits_for_its_best_tokens():
    torch.manual_seed(2)
    w, x = torch.randn(500, 64), torch.randn(4, 64)
    head = ShortlistHead(int8_linear(w), w, shortlist=8)
    exact, got = x @ w.T, head(x)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    top = exact.topk(3, dim=-1).indices
    torch.testing.assert_close(got.gather(-1, top), exact.gather(-1, top))


def test_auto_means_the_files_own_int4_on_cpu_and_none_elsewhere():
    assert resolve_quantization("auto", CPU, file_has_int4=True) == "int4"
    assert resolve_quantization("auto", CPU, file_has_int4=False) == "none"
    assert resolve_quantization("auto", torch.device("cuda"), file_has_int4=True) == "none"
    assert resolve_quantization("int8", CPU, file_has_int4=False) == "int8"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_quantization("int4", torch.device("cuda"), file_has_int4=True)
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_quantization("int3", CPU, file_has_int4=False)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_computes_with_its_own_weights(mode, tiny_model_factory):
    path = tiny_model_factory("qwen2")  # qkv bias: added after the quantized matmul
    assert LLM(model=path).model_info["quantization"] == "none"  # auto: a float checkpoint runs as it is
    quant = LLM(model=path, quantization=mode)
    assert quant.model_info["quantization"] == mode
    # the float model on the weights the quantized one holds gives the same hidden states, up to
    # the bf16 rounding of the quantized kernels' activations
    weights = dict(load_state_dict(Path(path)))
    for name, w in weights.items():
        if name.endswith("proj.weight"):
            weights[name] = quantize_int4(w).dequantize() if mode == "int4" else _int8_weights(w)
    reference = Model(quant.model.config, weights, CPU, torch.float32, 64)
    ids = [5, 77, 120, 9, 33, 200, 14, 3]
    ref, got = prefill_hidden(reference, ids), prefill_hidden(quant.model, ids)
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max()
    out = quant.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8


def _int8_weights(w: torch.Tensor) -> torch.Tensor:
    lin = int8_linear(w)
    return lin.weight.float() * lin.scales.float().unsqueeze(-1)


@pytest.mark.slow
def test_default_models_int4_codes_are_the_gguf_weights(default_llm):
    from chatpager.engine.model.loader import load_int4_codes, load_state_dict, resolve_model_dir

    model_dir = resolve_model_dir(None)
    codes = load_int4_codes(None, model_dir)
    floats = load_state_dict(model_dir)
    layers = default_llm.model.config.num_layers
    assert codes is not None and len(codes) == 7 * layers + 1  # every projection, and the head
    head = codes["model.embed_tokens.weight"]  # tied; Q8_0 in the file, so quantized once and cached
    assert (head.dequantize() - floats["model.embed_tokens.weight"]).abs().max() <= head.scale.max() / 2 + 1e-6
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight"):
        assert torch.equal(codes[name].dequantize(), floats[name])


@pytest.mark.slow
def test_default_fast_path_keeps_quality(default_llm):
    # Measured (AMD EPYC, 2026-12-04): 99.96 % agreement (1 miss in 2,329 tokens), perplexity
    # +0.90 %. With every RMSNorm weight scaled by 1 + 2^-21 or 2^-18 times noise, which moves
    # the fp32 logits more than another CPU's rounding would (`python -m chatpager.bench.quality
    # --rounding-noise 4.8e-7`, and 3.8e-6: 6 runs each, 6 more with other seeds), agreement
    # stayed within 99.91-99.96 % and the perplexity change within +0.90-0.91 %: the bounds
    # leave 44 tokens and 1.1 points of room.
    fast = LLM(num_blocks=1)
    assert fast.model_info["quantization"] == "int4"
    result = compare(fast, default_llm, documents(default_llm.tokenizer))
    assert result.tokens >= 2000
    assert result.agreement >= 0.98, result.line()
    assert abs(result.perplexity_change) <= 0.02, result.line()
