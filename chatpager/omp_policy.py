"""How torch's OpenMP threads wait between parallel regions, chosen once before torch loads.

libgomp reads OMP_WAIT_POLICY when it is loaded (with torch) and never again. Its default
(unset) spins a while, then sleeps: on free cores that is the fastest choice for every workload
chatpager runs (measured on the 2-core dev machine, BENCHMARKS.md: 16 sessions x 3 turns took
10.1 s unset, 10.7 s ACTIVE, 16.1 s PASSIVE; one stream decoded 67-69 tok/s under all three).
When other processes already keep the cores busy, spinning threads fight them for the CPU at
every barrier (a first prefill took 1.8-2.7 s spinning against 0.2-0.3 s sleeping at load 3-6),
so then threads sleep (PASSIVE). A policy the user set always wins.

How many threads: torch's default, one per core, except for an engine beside the TUI
(`threads_beside_a_front_end`): the app's own thread takes a core while replies stream, and an
OpenMP team that counts on that core waits for it at every barrier (2-core machine, in the TUI:
a greedy 400-token reply took 5.5-5.9 s with two engine threads, 4.7-5.0 s with one; eight
sessions of 128 tokens at once 6.10 s with two, 4.92 s with one; BENCHMARKS.md).
"""
from __future__ import annotations

import os


def choose_wait_policy(environ: dict | None = None, load: float | None = None,
                       cores: int | None = None) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ` (os.environ) when the 1-minute load average
    already fills every core and the user set no policy. Returns the policy now in effect
    (None: libgomp's default). Call before torch is imported."""
    env = os.environ if environ is None else environ
    if env.get("OMP_WAIT_POLICY"):
        return env["OMP_WAIT_POLICY"]
    load = os.getloadavg()[0] if load is None else load
    cores = (os.cpu_count() or 1) if cores is None else cores
    if load >= cores:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        return "PASSIVE"
    return None


def threads_beside_a_front_end(environ: dict | None = None, cores: int | None = None) -> int | None:
    """Threads for an engine whose front end keeps a core busy: one core fewer than the machine
    has, at least one. None when the user set OMP_NUM_THREADS (torch follows it)."""
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        return None
    cores = (os.cpu_count() or 1) if cores is None else cores
    return max(1, cores - 1)
