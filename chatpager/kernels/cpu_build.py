"""Building and loading chatpager's C++ CPU kernels (`cpu_int4.cpp`, `cpu_attention.cpp`).

A kernel is compiled with g++ the first time it is needed and cached under the user cache dir,
keyed by its source, the shared headers beside it (`*.h`), the flags and the compiler, so a changed
kernel is rebuilt and a cached one loads in milliseconds. `load` returns None — with one logged
line saying why — when the CPU lacks the instructions, g++ is missing or the build fails, or when
the kernel's environment switch is 0; the caller then uses torch's ops. A kernel shares torch's
OpenMP runtime (the .so links libgomp, which torch has already loaded), so its threads are torch's
threads, as many as torch's ops use on the calling thread.

Invariant: a cached .so is complete (built beside its final name and renamed) and depends only on
the key's inputs: explicit ISA flags rather than -march=native, checked against the CPU at load.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.autograd.profiler as _profiler

AVX512_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl",
                "-mavx512dq", "-mf16c", "-mfma")
AVX512_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c", "fma")


def cpu_supports(needed: tuple[str, ...]) -> bool:
    """Whether /proc/cpuinfo lists every one of `needed`."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return all(f in flags for f in needed)


def cache_dir() -> Path:
    import platformdirs

    return Path(os.environ.get("CHATPAGER_CACHE_DIR") or platformdirs.user_cache_dir("chatpager")) / "kernels"


def build(source: Path, flags: tuple[str, ...], compiler: str) -> Path:
    """The cached library of `source`, compiled now if there is none for this key."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    inputs = [source.read_bytes()] + [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256(b"".join(inputs) + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # built beside the target and renamed: a concurrent or interrupted build never leaves half a file
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        res = subprocess.run([compiler, *flags, str(source), "-o", str(out)], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{compiler} failed: {res.stderr.strip()[-500:]}")
        os.replace(out, target)
    return target


def load(source: Path, flags: tuple[str, ...], cpu_flags: tuple[str, ...], switch: str, fallback: str,
         log: logging.Logger) -> ctypes.CDLL | None:
    """The kernel's library, or None after one line on `log`. `switch`: the environment variable
    that disables it when 0; `fallback`: what the caller runs instead, for the log line."""
    name = source.stem
    if os.environ.get(switch, "1") == "0":
        log.info("%s kernel disabled by %s=0; using %s", name, switch, fallback)
        return None
    if not cpu_supports(cpu_flags):
        log.info("%s kernel needs %s, which this CPU lacks; using %s", name, ", ".join(cpu_flags), fallback)
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        log.warning("%s kernel needs g++ to build, none found; using %s", name, fallback)
        return None
    try:
        return ctypes.CDLL(str(build(source, flags, compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("%s kernel unavailable (%s); using %s", name, e, fallback)
        return None


def call(label: str, fn: Callable, *args):
    """fn(*args), under `label` in the torch profiler's table when it records (it does not see a
    ctypes call otherwise)."""
    if _profiler._is_profiler_enabled:
        with torch.profiler.record_function(label):
            return fn(*args)
    return fn(*args)
