"""The one place that decides how Triton runs: compiled on a CUDA GPU, or interpreted on CPU.

Triton reads TRITON_INTERPRET when a function is decorated with `@triton.jit`. That happens
for our kernels when their modules are imported, and for Triton's own library of jit helpers
(`tl.max`, `tl.sum`, `tl.zeros`, `tl.cdiv`, ...) when triton itself is first imported. Every
Triton module in chatpager gets `triton` from `import_triton()`, which sets the variable first.
If something else imported triton earlier with the interpreter off (transformers does, through
torch), the library helpers were decorated for the compiler and fail inside an interpreted
kernel; `import_triton` then decorates them again under the interpreter.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch


def import_triton(interpret: bool | None = None) -> ModuleType:
    """Import triton, switching its interpreter on first when kernels cannot be compiled here.

    interpret=None: interpret when no CUDA device is available, unless TRITON_INTERPRET is
    already set (an explicit choice wins, e.g. TRITON_INTERPRET=0 to compile kernels for a GPU
    target on a machine without one). interpret=True forces the interpreter (e.g. to run a
    GPU machine's code path on CPU tensors); it only affects kernels decorated after this call.
    """
    if interpret is None:
        explicit = os.environ.get("TRITON_INTERPRET")
        interpret = _truthy(explicit) if explicit is not None else not torch.cuda.is_available()
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    if interpret:
        _interpret_triton_library()
    return triton


def _interpret_triton_library() -> None:
    """Re-decorate triton.language's jit helpers if they were decorated for the compiler."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.standard.max, InterpretedFunction):
        return
    old = dict(vars(tl.standard))
    importlib.reload(tl.standard)  # TRITON_INTERPRET is set now: the helpers come back interpreted
    for name, value in list(vars(tl).items()):
        if name in old and value is old[name]:
            setattr(tl, name, getattr(tl.standard, name))


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (and so accept CPU tensors)."""
    return _truthy(os.environ.get("TRITON_INTERPRET", "0"))


def _truthy(value: str) -> bool:
    return value.lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when the Triton kernels can run here: triton installed, and a GPU or the interpreter."""
    try:
        import_triton()
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreting()
