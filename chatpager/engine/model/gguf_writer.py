"""GGUF files written the way llama.cpp's converter writes them, for tests and benchmarks.

`write_gguf` writes metadata and tensors (one file, or a split set `name-0000N-of-0000M.gguf`),
streaming each tensor as it is made, so a file of real size never sits in memory whole.
`hf_to_gguf` converts a Hugging Face directory of a supported layout: config into llama.cpp's
metadata keys, tensors to GGUF names with each weight in the type asked for, a "llama" model's
q/k rows permuted as llama.cpp permutes them, Llama 3 RoPE as its `rope_freqs` divisors, the
tokenizer as its vocabulary. `make_tiny_gguf` does that for a tiny random model.

Weights are encoded as the `gguf` package defines the types (its `quants.dequantize` is the
oracle). It cannot encode the K-quants; `quantize` does for Q4_K, Q5_K and Q6_K, with one plain
scale and minimum per sub-block (not llama.cpp's searched ones: valid blocks, a little less
accurate). Imported by tests and benchmarks only (it needs transformers for `make_tiny_gguf`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chatpager.engine.model.gguf_file import gguf_name, read_metadata
from chatpager.kernels.gguf_quants import BLOCKS, TYPE_IDS

_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_CONTROL, _NORMAL = 3, 1


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """A tensor to write: GGUF name, type, shape in torch order (rows, cols) and a function
    making its stored form (`quantize`'s result), called when the tensor is written."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def write_gguf(path: str | Path, arch: str, metadata: Mapping[str, Any], tensors: Iterable[PlannedTensor],
               split_max_tensors: int = 0) -> list[Path]:
    """Write a GGUF file (or a split set of at most `split_max_tensors` tensors a part); the
    paths written, first part first."""
    import gguf

    tensors = list(tensors)
    writer = gguf.GGUFWriter(Path(path), arch, split_max_tensors=split_max_tensors)
    for key, value in metadata.items():
        _put(writer, key, value)
    for t in tensors:
        type_id = TYPE_IDS[t.type_name]
        _, block, block_bytes = BLOCKS[type_id]
        nbytes = int(np.prod(t.shape)) // block * block_bytes
        if t.type_name in ("F32", "F16"):
            dtype = np.dtype(np.float32 if t.type_name == "F32" else np.float16)
            writer.add_tensor_info(t.name, t.shape, dtype, nbytes)
        else:
            byte_shape = (*t.shape[:-1], t.shape[-1] // block * block_bytes)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(type_id))
    paths = writer.format_shard_names(Path(path))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(np.ascontiguousarray(t.make()))
    writer.close()
    return paths


def _put(writer, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"cannot write metadata {key}={value!r}")


# --- encodings ---------------------------------------------------------------------------------

def quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """A float matrix [rows, cols] in a GGUF type's stored form: float32 / float16 values, or
    uint8 blocks [rows, row_bytes]."""
    import gguf

    values = np.asarray(values, dtype=np.float32)
    if type_name == "F32":
        return values
    if type_name == "F16":
        return values.astype(np.float16)
    _, block, block_bytes = BLOCKS[TYPE_IDS[type_name]]
    if values.shape[-1] % block:
        raise ValueError(f"{type_name} needs rows of a multiple of {block} values, got {values.shape[-1]}")
    if type_name in _K_QUANTS:
        blocks = values.reshape(-1, block)
        return _K_QUANTS[type_name](blocks).reshape(*values.shape[:-1], values.shape[-1] // block * block_bytes)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType(TYPE_IDS[type_name]))


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x as float16 bytes [..., 2], and the float32 value it rounds to."""
    h = x.astype(np.float16)
    return h[..., None].view(np.uint8), h.astype(np.float32)


def _scale_min_blocks(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: 8 sub-blocks of 32, each w = d * sc * q - dmin * m, sc and m 6-bit."""
    x = blocks.reshape(-1, 8, 32)
    minimum = np.maximum(-x.min(-1), 0)  # stored positive, subtracted
    scale = (x.max(-1) + minimum) / levels
    d_bytes, d = _f16(scale.max(-1) / 63)
    m_bytes, dmin = _f16(minimum.max(-1) / 63)
    sc = np.clip(np.round(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), 0, 63)
    mn = np.clip(np.round(np.divide(minimum, dmin[:, None], out=np.zeros_like(minimum), where=dmin[:, None] > 0)),
                 0, 63)
    step = (d[:, None] * sc)[..., None]
    q = np.round(np.divide(x + (dmin[:, None] * mn)[..., None], step, out=np.zeros_like(x), where=step > 0))
    q = np.clip(q, 0, levels).astype(np.uint8)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    packed = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, mn[:, :4] | (mn[:, 4:] >> 4) << 6,
                             (sc[:, 4:] & 0xF) | (mn[:, 4:] & 0xF) << 4], axis=1)
    return d_bytes, m_bytes, packed, q.reshape(-1, 4, 2, 32)  # q: [block, pair of sub-blocks, which, 32]


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _scale_min_blocks(blocks, 15)
    qs = (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)
    return np.concatenate([d, dmin, scales, qs], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _scale_min_blocks(blocks, 31)
    qs = ((q[:, :, 0] & 0xF) | (q[:, :, 1] & 0xF) << 4).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 8, 32)  # bit j of qh[l]: the high bit of sub-block j's value l
    qh = sum(high[:, j] << j for j in range(8)).astype(np.uint8)
    return np.concatenate([d, dmin, scales, qh, qs], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    """16 sub-blocks of 16, w = d * sc * (q - 32), sc int8, q 6-bit."""
    x = blocks.reshape(-1, 16, 16)
    scale = np.abs(x).max(-1) / 31
    d_bytes, d = _f16(scale.max(-1) / 127)
    sc = np.clip(np.round(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), 0, 127)
    step = (d[:, None] * sc)[..., None]
    q = np.round(np.divide(x, step, out=np.zeros_like(x), where=step > 0)) + 32
    q = np.clip(q, 0, 63).astype(np.uint8).reshape(-1, 2, 4, 32)  # [block, half, quarter, 32]
    ql = np.concatenate([q[:, :, 0] & 0xF | (q[:, :, 2] & 0xF) << 4, q[:, :, 1] & 0xF | (q[:, :, 3] & 0xF) << 4],
                        axis=2).reshape(-1, 128)
    qh = sum((q[:, :, k] >> 4) << 2 * k for k in range(4)).astype(np.uint8).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d_bytes.reshape(-1, 2)], axis=1)


_K_QUANTS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


# --- from a Hugging Face directory -------------------------------------------------------------

def hf_to_gguf(path: str | Path, model_dir: str | Path, types: Mapping[str, str] | None = None,
               metadata: Mapping[str, Any] | None = None, split_max_tensors: int = 0) -> list[Path]:
    """Convert a Hugging Face directory (config.json, safetensors, tokenizer.json) to GGUF.
    `types` maps a GGUF name without its suffix ("blk.0.ffn_down"), else its part ("ffn_down",
    "token_embd", "output"), else "*" to a type name; the default is F32. Vectors are F32.
    `metadata` adds to or replaces what is derived (None drops a key): another vocabulary
    (`vocab_from_gguf`; its tokens replace every tokenizer.* key), no chat template, a wrong
    size for a test."""
    from safetensors.numpy import load_file

    from chatpager.engine.config import ModelConfig

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    config = ModelConfig.from_dict(raw)
    arch = _ARCH[config.model_type]
    weights: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    metadata = dict(metadata or {})
    vocab = {} if "tokenizer.ggml.tokens" in metadata else vocab_of(model_dir)  # another vocabulary replaces it whole
    derived = _metadata(arch, config) | vocab | metadata
    planned = [_plan(gguf_name(name), w, arch, config, types or {}) for name, w in weights.items()]
    if config.rope_parameters["rope_type"] == "llama3":
        divisors = _llama3_divisors(config)
        planned.append(PlannedTensor("rope_freqs.weight", "F32", divisors.shape, lambda: divisors))
    return write_gguf(path, arch, {k: v for k, v in derived.items() if v is not None}, planned, split_max_tensors)


def _plan(name: str, w: np.ndarray, arch: str, config, types: Mapping[str, str]) -> PlannedTensor:
    w = w.astype(np.float32)
    part = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
    if arch == "llama" and part in ("attn_q", "attn_k"):  # llama.cpp's row order for its RoPE
        heads = config.num_heads if part == "attn_q" else config.num_kv_heads
        w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    kind = "F32" if w.ndim == 1 else types.get(name.rsplit(".", 1)[0], types.get(part, types.get("*", "F32")))
    return PlannedTensor(name, kind, w.shape, lambda: quantize(w, kind))


def _metadata(arch: str, config) -> dict[str, Any]:
    key = lambda k: f"{arch}.{k}"
    rope = config.rope_parameters
    out: dict[str, Any] = {
        "general.name": f"chatpager test {arch}",
        key("context_length"): config.max_position_embeddings,
        key("embedding_length"): config.hidden_size,
        key("block_count"): config.num_layers,
        key("feed_forward_length"): config.intermediate_size,
        key("attention.head_count"): config.num_heads,
        key("attention.head_count_kv"): config.num_kv_heads,
        key("rope.freq_base"): float(rope["rope_theta"]),
        key("attention.layer_norm_rms_epsilon"): float(config.rms_norm_eps),
        key("rope.dimension_count"): config.head_dim,
        key("vocab_size"): config.vocab_size,
    }
    if config.head_dim != config.hidden_size // config.num_heads:
        out[key("attention.key_length")] = out[key("attention.value_length")] = config.head_dim
    if config.uniform_sliding_window:
        out[key("attention.sliding_window")] = config.uniform_sliding_window
    if rope["rope_type"] in ("linear", "yarn"):
        out[key("rope.scaling.type")] = rope["rope_type"]
        out[key("rope.scaling.factor")] = float(rope["factor"])
        if rope["rope_type"] == "yarn":
            out[key("rope.scaling.original_context_length")] = rope["original_max_position_embeddings"]
    return out


def _llama3_divisors(config) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3 scaling: how much slower each frequency turns."""
    import torch

    from chatpager.engine.model.rope import _llama3_frequencies

    d = config.head_dim
    inv = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    return (inv / _llama3_frequencies(inv, config.rope_parameters)).numpy().astype(np.float32)


def vocab_of(model_dir: str | Path) -> dict[str, Any]:
    """tokenizer.* metadata of a directory's byte-level BPE tokenizer.json (llama.cpp's "gpt2"
    vocabulary): tokens by id, added special tokens as control ones, merges, named ids, template."""
    model_dir = Path(model_dir)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    special = {a["id"] for a in spec["added_tokens"] if a["special"]}
    by_id.update({a["id"]: a["content"] for a in spec["added_tokens"]})
    tokens = [by_id[i] for i in range(len(by_id))]
    ids = {t: i for i, t in enumerate(tokens)}
    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [_CONTROL if i in special else _NORMAL for i in range(len(tokens))],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]],
        "tokenizer.ggml.add_bos_token": False,
    }
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
                      ("unk_token", "unknown_token_id")):
        if isinstance(config.get(name), str) and config[name] in ids:
            out[f"tokenizer.ggml.{key}"] = ids[config[name]]
    template = model_dir / "chat_template.jinja"
    template = template.read_text() if template.is_file() else config.get("chat_template")
    if template:
        out["tokenizer.chat_template"] = template
    return out


def vocab_from_gguf(path: str | Path) -> dict[str, Any]:
    """The tokenizer.* metadata of another GGUF file (the default model's, say)."""
    return {k: v for k, v in read_metadata(path).items() if k.startswith("tokenizer.")}


def make_tiny_gguf(path: str | Path, arch: str = "llama", types: Mapping[str, str] | None = None,
                   metadata: Mapping[str, Any] | None = None, split_max_tensors: int = 0, seed: int = 0,
                   **overrides) -> Path:
    """A tiny random model of layout `arch` (`tiny_model.ARCHS`) as GGUF at `path`; returns the
    path of its first part. The model's Hugging Face directory stays beside it (`path` + ".hf"),
    the reference its tensors came from. A vocabulary in `metadata` sets the model's vocab_size."""
    from chatpager.engine.model.tiny_model import make_tiny_model

    path = Path(path)
    if metadata and "tokenizer.ggml.tokens" in metadata:
        overrides.setdefault("vocab_size", len(metadata["tokenizer.ggml.tokens"]))
    hf = make_tiny_model(path.with_name(path.name + ".hf"), arch=arch, seed=seed, **overrides)
    return hf_to_gguf(path, hf, types, metadata, split_max_tensors)[0]
