"""The one place that decides how Triton runs: compiled on a CUDA GPU, or interpreted on CPU.

Triton reads TRITON_INTERPRET when a kernel is decorated with `@triton.jit`, so the variable
must be set before any kernel module is imported. Every Triton module in chatpager gets
`triton` from `import_triton()` instead of importing it directly; that keeps the switch in
one function and makes "import the kernels on a machine without a GPU" just work.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch


def import_triton(interpret: bool | None = None) -> ModuleType:
    """Import triton, switching its interpreter on first when kernels cannot be compiled here.

    interpret=None: interpret exactly when no CUDA device is available.
    interpret=True forces the interpreter (e.g. to exercise a GPU machine's code path on CPU
    tensors); it only affects kernels decorated after this call.
    """
    if interpret is None:
        interpret = not torch.cuda.is_available()
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    return triton


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (and so accept CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when the Triton kernels can run here: triton installed, and a GPU or the interpreter."""
    try:
        import_triton()
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreting()
