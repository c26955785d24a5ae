"""Attention kernels over a paged KV cache.

`paged_attention_torch` / `write_kv_torch` define the contract and run anywhere.
The Triton versions are imported lazily: on CPU, Triton only runs under its interpreter,
and TRITON_INTERPRET must be set before triton is first imported (`triton_env.import_triton`
does that). `triton_available()` says whether the Triton versions can run here.
"""
from chatpager.kernels.paged_attention_torch import paged_attention_torch
from chatpager.kernels.triton_env import triton_available
from chatpager.kernels.write_kv_torch import write_kv_torch


def __getattr__(name: str):
    if name == "paged_attention_triton":
        from chatpager.kernels.paged_attention_triton import paged_attention_triton as fn
    elif name == "write_kv_triton":
        from chatpager.kernels.write_kv_triton import write_kv_triton as fn
    else:
        raise AttributeError(name)
    # Importing the submodule bound its *module* under this same name; bind the function.
    globals()[name] = fn
    return fn


__all__ = [
    "paged_attention_torch",
    "write_kv_torch",
    "paged_attention_triton",
    "write_kv_triton",
    "triton_available",
]
