"""A GGUF model read as it is stored: metadata, tensors as views of the memory-mapped file, the
config `ModelConfig.from_dict` takes, and the tokenizer (`gguf_tokenizer`). No transformers.

- A model is one file or a split set (`name-00001-of-00003.gguf`, as llama.cpp's gguf-split and
  gguf-py write it): every part is opened, the first holds the metadata, each says which part it
  is (`split.no`, `split.count`), and together they hold `split.tensors.count` tensors.
- Tensors are not copied. A 2-D tensor comes out as a `GGUFMatrix` over the file's bytes (any
  type of `gguf_quants.BLOCKS`, F32/F16/BF16 included); the map is read-only and shared with the
  page cache, so its pages cost memory only once read, and writing into one faults. 1-D tensors
  (norms, biases) are small and come out as float32 copies.
- Names are the Hugging Face ones the model loader uses (`model.layers.3.self_attn.q_proj.weight`).
  llama.cpp permutes the rows of a "llama" file's q and k projections (and biases) for its RoPE
  layout; `weights()` undoes that by permuting whole rows (`GGUFMatrix.select_rows`: a copy of
  those rows' blocks, exact for every type), as transformers does when it converts the file.
- Llama 3's RoPE scaling is stored as per-frequency divisors (`rope_freqs.weight`) rather than
  metadata: its parameters are recovered from them and checked to reproduce them
  (transformers' conversion ignores the tensor, and runs such a model with unscaled RoPE).
- Every problem (not a GGUF, truncated, a missing part, another architecture, a tensor type
  without a kernel, metadata and tensors that disagree) is one ModelLoadError naming the file.
"""
from __future__ import annotations

import math
import mmap
import re
import struct
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatpager.engine.model.tokenizer import Tokenizer
from chatpager.errors import ModelLoadError
from chatpager.kernels.gguf_quants import BLOCKS, GGUFMatrix

ARCHITECTURES = ("llama", "qwen2", "qwen3")  # GGUF's names; Mistral's files say "llama"
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp dropped it in 2023
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_F32, _F16, _BF16 = 0, 1, 30

# GGUF tensor name -> Hugging Face name: the model's own, and a layer's part (blk.{i}.{part}.weight|bias)
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_ROPE_FREQS = "rope_freqs.weight"  # read into the config (Llama 3 RoPE), not a weight
# End-of-generation tokens llama.cpp recognizes by their text (when the file marks them control)
_EOG_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "<end_of_utterance>")
_CONTROL = 3


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lies: `shape` in torch order (rows, cols), bytes [start, start + nbytes)
    of part `part` of the set."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    part: int
    start: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class _Part:
    path: Path
    buffer: np.ndarray  # uint8 view of the whole mapped file
    metadata: dict[str, Any]
    tensors: list[TensorInfo]


class GGUFFile:
    """One GGUF model (a file or a split set), opened with `GGUFFile.open(path)`."""

    def __init__(self, parts: list[_Part]) -> None:
        self.parts = parts
        self.path = parts[0].path
        self.metadata = parts[0].metadata  # only the first part of a split set has the model's
        self.tensors = {t.name: t for p in parts for t in p.tensors}
        self.arch = self._require("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ModelLoadError(f"{self.path}: unsupported architecture {self.arch!r}: chatpager runs "
                                 f"{', '.join(ARCHITECTURES)} GGUF files")

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """Map the file; a part of a split set (any part) maps every part."""
        path = Path(path)
        parts = [_read_part(name, i) for i, name in enumerate(_set_names(path))]
        _check_set(path, parts)
        return cls(parts)

    # --- metadata --------------------------------------------------------------------------

    def _require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ModelLoadError(f"{self.path}: its metadata lacks {key}")
        return self.metadata[key]

    def _arch(self, key: str, default: Any = ...) -> Any:
        full = f"{self.arch}.{key}"
        return self._require(full) if default is ... else self.metadata.get(full, default)

    def _per_layer(self, key: str, default: Any = ...) -> int:
        """A count that may be written once or once per layer: one value for every layer."""
        value = self._arch(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ModelLoadError(f"{self.path}: {self.arch}.{key} differs between layers ({value}); "
                                     "chatpager runs models whose layers are alike")
            value = value[0]
        return value

    @cached_property
    def config_dict(self) -> dict[str, Any]:
        """The model's config in config.json's terms, for `ModelConfig.from_dict`."""
        hidden, heads = self._arch("embedding_length"), self._per_layer("attention.head_count")
        head_dim = (self._arch("attention.key_length", None) or self._arch("rope.dimension_count", None)
                    or hidden // heads)
        rotary = self._arch("rope.dimension_count", head_dim)
        if rotary != head_dim or self._arch("attention.value_length", head_dim) != head_dim:
            raise ModelLoadError(f"{self.path}: RoPE over {rotary} of {head_dim} head dimensions, or values of "
                                 "another width: chatpager runs full rotary, equal key and value heads")
        theta = float(self._arch("rope.freq_base", 10000.0))
        window = self._arch("attention.sliding_window", None)
        config = {
            "model_type": self.arch,
            "vocab_size": self._arch("vocab_size", None) or len(self._require("tokenizer.ggml.tokens")),
            "hidden_size": hidden,
            "intermediate_size": self._per_layer("feed_forward_length"),
            "num_hidden_layers": self._arch("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._per_layer("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "rms_norm_eps": self._arch("attention.layer_norm_rms_epsilon"),
            "max_position_embeddings": self._arch("context_length"),
            "rope_theta": theta,
            "rope_scaling": self._rope_scaling(head_dim, theta),
            "hidden_act": "silu",
            # llama.cpp writes the output projection only when it is not the embedding
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "sliding_window": window,
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.metadata.get("tokenizer.ggml.padding_token_id"),
        }
        if self.arch in ("qwen2", "qwen3"):  # a window the file states holds on every layer
            config.update(use_sliding_window=window is not None, max_window_layers=0)
        return config

    def _rope_scaling(self, head_dim: int, theta: float) -> dict[str, Any] | None:
        kind = self._arch("rope.scaling.type", "none")
        if _ROPE_FREQS in self.tensors:
            if kind not in ("none", "llama3"):
                raise ModelLoadError(f"{self.path}: both {_ROPE_FREQS} and RoPE scaling {kind!r}")
            return _llama3_scaling(self._float(self.tensors[_ROPE_FREQS]), theta, head_dim, self.path)
        if kind == "none":
            return None
        factor = float(self._arch("rope.scaling.factor"))
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            scaling = {"rope_type": "yarn", "factor": factor,
                       "original_max_position_embeddings": self._arch("rope.scaling.original_context_length")}
            for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
                if f"{self.arch}.rope.scaling.{theirs}" in self.metadata:
                    scaling[ours] = float(self._arch(f"rope.scaling.{theirs}"))
            return scaling
        raise ModelLoadError(f"{self.path}: unsupported RoPE scaling {kind!r} (none, linear, yarn, llama3 are)")

    @property
    def chat_template(self) -> str | None:
        """The file's default chat template; None for a model that has none (a base model)."""
        return self.metadata.get("tokenizer.chat_template") or None

    def tokenizer(self) -> Tokenizer:
        from chatpager.engine.model.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(self.metadata, self.chat_template, str(self.path))

    def eos_token_ids(self) -> set[int]:
        """The tokens that end generation: eos, end-of-turn and end-of-message as the file names
        them, and the control tokens llama.cpp treats as such by their text (Qwen's <|endoftext|>
        beside its eos <|im_end|>, Llama 3's <|eot_id|> and <|eom_id|>)."""
        ids = {self.metadata[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                          "tokenizer.ggml.eom_token_id") if k in self.metadata}
        tokens = self.metadata.get("tokenizer.ggml.tokens", [])
        types = self.metadata.get("tokenizer.ggml.token_type") or []
        ids.update(i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == _CONTROL and t in _EOG_TEXTS)
        return ids

    # --- tensors -----------------------------------------------------------------------------

    def tensor(self, name: str) -> GGUFMatrix | torch.Tensor:
        """One tensor by its GGUF name, as stored: a GGUFMatrix view (2-D), float32 (1-D)."""
        info = self.tensors[name]
        if len(info.shape) == 1:
            return self._float(info)
        rows, cols = info.shape
        view = self._bytes(info).reshape(rows, info.nbytes // rows)
        with warnings.catch_warnings():  # read-only on purpose: the weights are never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return GGUFMatrix(info.type_id, torch.from_numpy(view), rows, cols)

    def _bytes(self, info: TensorInfo) -> np.ndarray:
        return self.parts[info.part].buffer[info.start:info.start + info.nbytes]

    def _float(self, info: TensorInfo) -> torch.Tensor:
        raw = self._bytes(info)
        if info.type_id == _F32:
            values = raw.view("<f4").astype(np.float32)
        elif info.type_id == _F16:
            values = raw.view("<f2").astype(np.float32)
        elif info.type_id == _BF16:
            values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:  # a quantized vector: rare, small, dequantized as the gguf package defines it
            from gguf.quants import dequantize

            values = dequantize(raw, info.type_id).astype(np.float32)
        return torch.from_numpy(values.reshape(info.shape))

    def weights(self) -> GGUFWeights:
        """The model's tensors by Hugging Face name, each made when asked for (a view; a llama q/k
        matrix a row-permuted copy, made again on each access)."""
        return GGUFWeights(self)


class GGUFWeights(Mapping):
    """Hugging Face name -> GGUFMatrix (2-D) or float32 tensor (1-D), checked against the config;
    llama q/k rows (and biases) in Hugging Face order."""

    def __init__(self, file: GGUFFile) -> None:
        self.file = file
        c = file.config_dict
        self._heads = {"attn_q": c["num_attention_heads"], "attn_k": c["num_key_value_heads"]}
        self._names: dict[str, str] = {}  # HF -> GGUF
        for name, info in file.tensors.items():
            if name == _ROPE_FREQS:
                continue
            hf = hf_name(name)
            if hf is None:
                raise ModelLoadError(f"{file.path}: unexpected tensor {name} for a {file.arch} model")
            want = _expected_shape(hf, c)
            if want is not None and info.shape != want:
                raise ModelLoadError(f"{file.path}: tensor {name} has shape {list(info.shape)}, "
                                     f"the metadata implies {list(want)}")
            self._names[hf] = name
        for hf in _required(c):
            if hf not in self._names:
                raise ModelLoadError(f"{file.path}: lacks the tensor {gguf_name(hf)} ({hf})")

    def __getitem__(self, name: str) -> GGUFMatrix | torch.Tensor:
        gguf = self._names[name]
        tensor = self.file.tensor(gguf)
        part = gguf.split(".")[2] if gguf.startswith("blk.") else None
        if self.file.arch == "llama" and part in self._heads:
            order = _unpermute_rows(tensor.rows if isinstance(tensor, GGUFMatrix) else tensor.numel(),
                                    self._heads[part])
            tensor = tensor.select_rows(order) if isinstance(tensor, GGUFMatrix) else tensor[order]
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def type_of(self, name: str) -> int:
        """The stored GGML type id of a tensor, without reading it."""
        return self.file.tensors[self._names[name]].type_id


def _set_names(path: Path) -> list[Path]:
    """The file, or every part of the split set its name says it belongs to, first part first."""
    match = SPLIT_NAME.match(path.name)
    count = int(match["count"]) if match else 1
    if count <= 1:
        return [path]
    names = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [n for n in names if not n.is_file()]
    if missing:
        raise ModelLoadError(f"{path} is part of a model split into {count} files, and {missing[0]} is missing"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return names


def _check_set(path: Path, parts: list[_Part]) -> None:
    """Each part says it is the one its name says (`split.no`, `split.count`), and together they
    hold the tensors the first says, each once."""
    if len(parts) == 1:
        split = parts[0].metadata
        if int(split.get("split.count", 1)) > 1:
            raise ModelLoadError(f"{path}: part {split.get('split.no', 0) + 1} of a model split into "
                                 f"{split['split.count']} files, but its name does not say which "
                                 "(expected NAME-0000N-of-0000M.gguf)")
        return
    for i, p in enumerate(parts):
        no, of = p.metadata.get("split.no"), p.metadata.get("split.count")
        if (no, of) != (i, len(parts)):
            raise ModelLoadError(f"{p.path}: says it is part {'?' if no is None else no + 1} of {of or '?'}, "
                                 f"but its name says part {i + 1} of {len(parts)}")
    names = [t.name for p in parts for t in p.tensors]
    expected = parts[0].metadata.get("split.tensors.count", len(names))
    if len(set(names)) != len(names) or expected != len(names):
        raise ModelLoadError(f"{path}: the split set holds {len(names)} tensors ({len(set(names))} different), "
                             f"its first part says {expected}")


def hf_name(gguf: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, None for one chatpager does not know."""
    if gguf in _GLOBAL:
        return _GLOBAL[gguf]
    parts = gguf.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    return None


def gguf_name(hf: str) -> str:
    """The GGUF name of a Hugging Face tensor name (`hf_name`'s inverse)."""
    for gguf, name in _GLOBAL.items():
        if name == hf:
            return gguf
    _, _, layer, rest = hf.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    part = next(p for p, m in _LAYER.items() if m == module)
    return f"blk.{layer}.{part}.{suffix}"


def _expected_shape(hf: str, c: dict[str, Any]) -> tuple[int, ...] | None:
    hidden, ffn, head_dim = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    if hf in ("model.embed_tokens.weight", "lm_head.weight"):
        return (c["vocab_size"], hidden)
    if not hf.startswith("model.layers."):
        return (hidden,)  # model.norm
    shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
              "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
              "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
              "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
              "self_attn.o_proj.bias": (hidden,),
              "self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,),
              "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
              "mlp.down_proj.weight": (hidden, ffn)}
    return shapes.get(hf.split(".", 3)[3])


def _required(c: dict[str, Any]) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not c["tie_word_embeddings"]:
        names.append("lm_head.weight")
    layer = ["input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
             "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    if c["model_type"] == "qwen3":
        layer += ["self_attn.q_norm", "self_attn.k_norm"]
    for i in range(c["num_hidden_layers"]):
        names += [f"model.layers.{i}.{m}.weight" for m in layer]
        if c["model_type"] == "qwen2":
            names += [f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"]
    return names


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation: it interleaves each head's two rotary
    halves (its row 2j is Hugging Face's row j, its row 2j + 1 Hugging Face's row half + j)."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)


def _llama3_scaling(divisors: torch.Tensor, theta: float, head_dim: int, path: Path) -> dict[str, Any] | None:
    """Llama 3's RoPE parameters from the per-frequency divisors llama.cpp stores (its converter
    computes them from the same formula): 1 for short wavelengths, `factor` for long ones, and
    1 / ((1 - s) / factor + s) between, s linear in the frequency. The low-frequency factor is
    taken as 1 (only the line matters), and the result must reproduce every divisor."""
    from chatpager.engine.model.rope import _llama3_frequencies

    d = divisors.double()
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor = float(d.max())
    if d.numel() != inv.numel():
        raise ModelLoadError(f"{path}: {_ROPE_FREQS} has {d.numel()} values for {inv.numel()} frequencies")
    if factor <= 1 + 1e-6:
        return None
    s = (1 / d - 1 / factor) / (1 - 1 / factor)  # 0 where slowed by factor, 1 where kept
    if bool((s <= 1e-4).all()):  # every wavelength longer than the original context: plain linear
        return {"rope_type": "linear", "factor": factor}
    band = (s > 1e-4) & (s < 1 - 1e-4)
    points = [(inv[band], s[band])]
    if int(band.sum()) < 2:  # the band holds no line: pin its ends between the neighbours
        kept, slowed = inv[s >= 1 - 1e-4], inv[s <= 1e-4]
        if kept.numel():
            points.append((kept.min().view(1), torch.ones(1, dtype=torch.float64)))
        if slowed.numel():
            points.append((slowed.max().view(1), torch.zeros(1, dtype=torch.float64)))
    x, y = torch.cat([p[0] for p in points]), torch.cat([p[1] for p in points])
    if x.numel() < 2:
        raise ModelLoadError(f"{path}: {_ROPE_FREQS} is not a Llama 3 RoPE scaling")
    slope, offset = np.polyfit(x.numpy(), y.numpy(), 1)  # s = slope * inv + offset
    if slope <= 0 or offset >= 0:
        raise ModelLoadError(f"{path}: {_ROPE_FREQS} is not a Llama 3 RoPE scaling")
    high = 1 - 1 / offset  # with low = 1: s = context * inv / (2 pi (high - 1)) - 1 / (high - 1)
    params = {"rope_type": "llama3", "factor": _tidy(factor), "low_freq_factor": 1.0,
              "high_freq_factor": _tidy(float(high)),
              "original_max_position_embeddings": round(2 * math.pi * slope * (high - 1))}
    got = _llama3_frequencies(inv.float(), params)
    if not torch.allclose(got, (inv / d).float(), rtol=1e-4, atol=0):
        raise ModelLoadError(f"{path}: {_ROPE_FREQS} is not a Llama 3 RoPE scaling")
    return params


def _tidy(x: float) -> float:
    """x without the float32 noise of the divisors it came from (4.0000006 -> 4.0)."""
    rounded = round(x, 3)
    return rounded if abs(rounded - x) <= 1e-5 * abs(x) else x


# --- reading one file ------------------------------------------------------------------------

def read_metadata(path: str | Path) -> dict[str, Any]:
    """One file's metadata, whatever its architecture (its tensors are not read)."""
    return _read_part(Path(path)).metadata


class _Truncated(Exception):
    pass


class _Cursor:
    """Sequential little-endian reads from the mapped header."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> tuple:
        try:
            values = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise _Truncated from None
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (n,) = self.take("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise _Truncated
        text = self.buf[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALAR:
            return self.take(_SCALAR[kind])[0]
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.take("<IQ")
            if item in _NUMPY:
                size = np.dtype(_NUMPY[item]).itemsize * count
                if self.pos + size > len(self.buf):
                    raise _Truncated
                values = np.frombuffer(self.buf, _NUMPY[item], count, self.pos).tolist()
                self.pos += size
                return values
            if count > len(self.buf):
                raise _Truncated
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {kind}")


def _read_part(path: Path, index: int = 0) -> _Part:
    """Header, metadata and tensor table of one file; its bytes mapped, not read."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from None
    if buf[:4] != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    cursor = _Cursor(buf)
    cursor.pos = 4
    try:
        (version,) = cursor.take("<I")
        if version not in _VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            kind = "a big-endian GGUF file" if swapped in _VERSIONS else f"GGUF version {version}"
            raise ModelLoadError(f"{path}: {kind}; chatpager reads little-endian GGUF v2 and v3")
        n_tensors, n_kv = cursor.take("<QQ")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string()
            (kind,) = cursor.take("<I")
            metadata[key] = cursor.value(kind)
        table = []
        for _ in range(n_tensors):
            name = cursor.string()
            (n_dims,) = cursor.take("<I")
            dims = cursor.take(f"<{n_dims}Q")
            type_id, offset = cursor.take("<IQ")
            table.append((name, tuple(reversed(dims)), type_id, offset))  # GGUF lists the fastest dimension first
    except _Truncated:
        raise ModelLoadError(f"{path} is truncated: it ends inside its header") from None
    except ValueError as exc:
        raise ModelLoadError(f"{path}: corrupt header: {exc}") from None
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-cursor.pos // alignment) * alignment
    buffer = np.frombuffer(buf, np.uint8)
    tensors = [_tensor_info(path, index, len(buf), data_start, alignment, *row) for row in table]
    return _Part(path, buffer, metadata, tensors)


def _tensor_info(path: Path, part: int, size: int, data_start: int, alignment: int,
                 name: str, shape: tuple[int, ...], type_id: int, offset: int) -> TensorInfo:
    if type_id not in BLOCKS:
        raise ModelLoadError(f"{path}: tensor {name} is of type {_type_name(type_id)}, which chatpager cannot "
                             f"run (it runs {', '.join(n for n, _, _ in BLOCKS.values())})")
    if not 1 <= len(shape) <= 2:
        raise ModelLoadError(f"{path}: tensor {name} has {len(shape)} dimensions; a {len(shape)}-D weight is "
                             "not part of the models chatpager runs")
    _, block, block_bytes = BLOCKS[type_id]
    if shape[-1] % block:
        raise ModelLoadError(f"{path}: tensor {name} has rows of {shape[-1]} values, not a whole number of "
                             f"{_type_name(type_id)} blocks of {block}")
    nbytes = math.prod(shape) // block * block_bytes
    start = data_start + offset
    if offset % alignment:
        raise ModelLoadError(f"{path}: corrupt tensor table: {name} starts at an unaligned offset")
    if start + nbytes > size:
        raise ModelLoadError(f"{path} is truncated: tensor {name} ends at byte {start + nbytes}, "
                             f"the file has {size}")
    return TensorInfo(name, type_id, shape, part, start, nbytes)


def _type_name(type_id: int) -> str:
    if type_id in BLOCKS:
        return BLOCKS[type_id][0]
    try:
        from gguf import GGMLQuantizationType

        return f"{GGMLQuantizationType(type_id).name} ({type_id})"
    except (ImportError, ValueError):
        return f"unknown type {type_id}"
