"""Small random-weight models of each supported layout, written as Hugging Face directories.

They load in well under a second, so tests (engine, kernels, TUI) exercise the real loading
and forward paths without the default model. The tokenizer is byte-level (every UTF-8 text
round-trips) with ChatML special tokens and chat template.
"""
from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

ARCHS = {
    "llama": dict(cls="LlamaConfig", extra=dict(rope_scaling=None)),
    "llama3-rope": dict(cls="LlamaConfig", extra=dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128})),
    "mistral": dict(cls="MistralConfig", extra=dict(sliding_window=None)),
    "qwen2": dict(cls="Qwen2Config", extra=dict(use_sliding_window=False)),
    "qwen3": dict(cls="Qwen3Config", extra=dict(use_sliding_window=False, head_dim=16)),
}


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:2])
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    fast.chat_template = CHATML
    return fast


def make_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random-weight model of layout `arch` (see ARCHS) to `path`; returns the path."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    path = Path(path)
    tokenizer = byte_tokenizer()
    spec = ARCHS[arch]
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=0.2, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(spec["extra"])
    settings.update(overrides)
    config = getattr(transformers, spec["cls"])(**settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases / norms too, so every weight matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
