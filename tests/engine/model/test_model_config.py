"""config.json read without transformers (`ModelConfig.from_dict`) against transformers'
AutoConfig on the same file: the tiny models as saved, and minimal files that leave every
optional key to the model type's defaults."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatpager.engine.config import ModelConfig
from chatpager.engine.model.loader import load_model_config
from chatpager.errors import ModelLoadError

SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


def from_transformers(model_dir) -> dict:
    """The fields of ModelConfig as transformers' config object gives them."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_dir)
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
    return dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=hf.rms_norm_eps, max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=hf.tie_word_embeddings, sliding_window=window,
        layer_types=tuple(getattr(hf, "layer_types", None) or ()),
        rope_type=hf.rope_parameters["rope_type"], rope_theta=hf.rope_parameters["rope_theta"],
        eos_token_id=hf.eos_token_id,
    )


def ours(model_dir) -> dict:
    c = load_model_config(model_dir)
    fields = {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                         "num_heads", "num_kv_heads", "head_dim", "rms_norm_eps",
                                         "max_position_embeddings", "tie_word_embeddings", "sliding_window",
                                         "layer_types", "eos_token_id")}
    return fields | dict(rope_type=c.rope_parameters["rope_type"], rope_theta=c.rope_parameters["rope_theta"])


@pytest.mark.parametrize("arch", ["llama", "llama3-rope", "mistral", "qwen2", "qwen3"])
def test_tiny_model_configs_read_as_transformers_reads_them(tiny_model_factory, arch):
    path = Path(tiny_model_factory(arch))
    assert ours(path) == from_transformers(path)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("extra", [{}, {"rope_theta": 5e5, "use_sliding_window": True, "sliding_window": 64,
                                        "max_window_layers": 1},
                                   {"rope_scaling": {"type": "linear", "factor": 2.0}, "sliding_window": None}])
def test_minimal_config_json_takes_transformers_defaults(tmp_path, model_type, extra):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **SIZES, **extra}))
    assert ours(tmp_path) == from_transformers(tmp_path)


def test_bad_config_json_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_config(tmp_path)  # missing
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_config(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        ModelConfig.from_dict({"model_type": "gpt2", **SIZES})
    with pytest.raises(ModelLoadError, match="lacks hidden_size"):
        ModelConfig.from_dict({"model_type": "llama", **SIZES, "hidden_size": None})
    with pytest.raises(ModelLoadError, match="activation 'gelu'"):
        ModelConfig.from_dict({"model_type": "llama", **SIZES, "hidden_act": "gelu"})


@pytest.mark.parametrize("rope", [
    None, {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},  # through transformers
])
def test_rope_tables_equal_transformers(tmp_path, rope):
    """Linear and Llama 3 scaling are computed without transformers; same floats as its formulas."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from chatpager.engine.model.rope import rope_tables

    raw = {"model_type": "llama", **SIZES, "head_dim": 32, "max_position_embeddings": 512,
           "rope_theta": 50000.0, "rope_scaling": rope}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = AutoConfig.from_pretrained(tmp_path)
    kind = hf.rope_parameters["rope_type"]
    if kind == "default":
        inv_freq, scale = 1.0 / (50000.0 ** (torch.arange(0, 32, 2, dtype=torch.int64).float() / 32)), 1.0
    else:
        inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](hf, torch.device("cpu"))
    freqs = torch.outer(torch.arange(512, dtype=torch.float32), inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = rope_tables(load_model_config(tmp_path), 512)
    assert torch.equal(cos, emb.cos() * scale) and torch.equal(sin, emb.sin() * scale)
