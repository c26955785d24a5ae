"""LoRA adapters in PEFT's format: reading them and checking them against the model.

An adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`, as
`peft`'s `save_pretrained` writes it. Each targeted projection `W` (q/k/v/o of attention,
gate/up/down of the MLP) gains `scaling * B @ A`, where A is [r, in], B is [out, r] and
scaling = lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`). The scaling is folded into
B on load, so the forward only adds `(x @ A.T) @ B.T` (see lora_layers.py).

What is refused, with an error naming the adapter and the problem (`LoraError`): another PEFT
method, DoRA, trained biases, extra trained modules (`modules_to_save`), per-module rank or
alpha patterns, tensors for modules or layers this model does not have (embeddings, the output
head), and shapes that disagree with the model or with the config's rank.

Residency, chosen and why: `max_loras` bounds the number of adapters an engine holds, and
registering more is an error. Every registered adapter stays resident in the stacked weights,
so any mix of adapters can share a step and the scheduler needs no per-step adapter budget
(loading on demand with LRU eviction would need one: a step could otherwise ask for more
adapters than there are slots). Adapters are small (r * (in + out) per projection: ~10 MB for
a rank-8 adapter on every projection of the default model in float32, against its 540 MB), so
keeping them all loaded costs little.

Identity: a request names its adapter (`SamplingParams.lora`), and that name enters the root of
the prefix-cache key (block_keys.root_key). An engine's adapters are fixed when it is built, so
within it a name always means the same weights.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from chatpager.engine.config import ModelConfig
from chatpager.errors import ChatpagerError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MODULES = ATTENTION + MLP
_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


_UNSUPPORTED = {  # settings that change what the adapter computes, in ways not implemented here
    "use_dora": "DoRA", "lora_bias": "a bias on lora_B", "modules_to_save": "extra trained modules",
    "rank_pattern": "a per-module rank", "alpha_pattern": "a per-module alpha",
    "fan_in_fan_out": "transposed (Conv1D) weights", "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA", "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trained token embeddings", "target_parameters": "LoRA on raw parameters",
}


class LoraError(ChatpagerError, ValueError):
    """An adapter that cannot be used with this model."""


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """One adapter's weights: (layer, module) -> (A [r, in], B * scaling [out, r])."""

    name: str
    path: str
    rank: int
    weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in features, out features) of every projection an adapter may target."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def read_config(name: str, path: Path) -> dict:
    """The adapter's config, checked for settings this engine does not implement."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise LoraError(f"LoRA adapter {name!r}: no {CONFIG_FILE} in {path}")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise LoraError(f"LoRA adapter {name!r}: cannot read {file}: {exc}") from None
    problems = []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type {config['peft_type']!r} is not LORA")
    if config.get("bias", "none") != "none":
        problems.append(f"trained biases (bias={config['bias']!r}) are not supported")
    problems += [f"{what} ({key}) is not supported" for key, what in _UNSUPPORTED.items() if config.get(key)]
    targets = config.get("target_modules")
    if isinstance(targets, list) and (unknown := sorted(set(targets) - set(MODULES))):
        problems.append(f"target_modules {unknown} are not among {', '.join(MODULES)}")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1:
        problems.append(f"r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)):
        problems.append(f"lora_alpha must be a number, got {alpha!r}")
    if problems:
        raise LoraError(f"LoRA adapter {name!r} ({path}): " + "; ".join(problems))
    return config


def load_adapter(name: str, path: str | os.PathLike, model: ModelConfig, dtype: torch.dtype,
                 device: torch.device) -> LoraAdapter:
    """Read and check one adapter directory against `model`'s shapes."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_config(name, path)
    rank = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise LoraError(f"LoRA adapter {name!r}: no {WEIGHTS_FILE} in {path}")
    shapes = module_shapes(model)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(file).items():
        m = _KEY.fullmatch(key)
        if m is None or m[3] not in shapes or (m[3] in MLP) != (m[2] == "mlp"):
            raise LoraError(f"LoRA adapter {name!r}: tensor {key!r} is for a module this engine does not "
                            f"adapt (supported: {', '.join(MODULES)})")
        layer = int(m[1])
        if layer >= model.num_layers:
            raise LoraError(f"LoRA adapter {name!r}: tensor {key!r} is for layer {layer}, but the model "
                            f"has {model.num_layers} layers")
        halves.setdefault((layer, m[3]), {})[m[4]] = tensor
    if not halves:
        raise LoraError(f"LoRA adapter {name!r}: {file} holds no LoRA weights")
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        where = f"LoRA adapter {name!r}, layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise LoraError(f"{where}: lora_A and lora_B must both be present")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = shapes[module]
        if a.shape != (rank, fan_in) or b.shape != (fan_out, rank):
            raise LoraError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit rank "
                            f"{rank} and the model's {fan_in} -> {fan_out} projection; expected "
                            f"({rank}, {fan_in}) / ({fan_out}, {rank})")
        weights[(layer, module)] = (a.to(device=device, dtype=dtype),
                                    (b.float() * scaling).to(device=device, dtype=dtype))
    return LoraAdapter(name, str(path), rank, weights)


def load_adapters(adapters: Mapping[str, str | os.PathLike] | None, max_loras: int, model: ModelConfig,
                  dtype: torch.dtype, device: torch.device) -> list[LoraAdapter]:
    """Every adapter of `LLM(lora_adapters=...)`, checked, in the order given."""
    if not isinstance(max_loras, int) or max_loras < 1:
        raise ValueError(f"max_loras must be a positive integer, got {max_loras!r}")
    adapters = dict(adapters or {})
    if len(adapters) > max_loras:
        raise ValueError(f"{len(adapters)} LoRA adapters given but max_loras is {max_loras}; every adapter "
                         f"stays loaded, so raise max_loras (--max-loras) or pass fewer")
    for name in adapters:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"LoRA adapter names must be non-empty strings without surrounding spaces, "
                             f"got {name!r}")
    return [load_adapter(name, path, model, dtype, device) for name, path in adapters.items()]
