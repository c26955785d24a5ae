"""What runs on tensors: the decoder model and its attention, RoPE, weights (loading, GGUF,
quantization, LoRA), the paged KV cache, the runner that turns a scheduled batch into tensors,
the tokenizer."""
