"""What the same workload would need from a contiguous, per-sequence KV cache.

Each session, at its peak (last turn: whole history + reply), under three schemes:
- contiguous `max_model_len`: every live session reserves the model's whole context;
- contiguous, kinder: a session reserves its prompt + max_tokens (known only per request);
- paged: ceil(tokens / block_size) blocks, and a block holding the same token chain as another
  session's (a shared system prompt) is stored once.
"Sessions that fit" = the pool's slots ÷ the mean per-session need under each scheme, with
the workload's own mix of prompts (sharing amortised over its sessions).
"""
from __future__ import annotations

import statistics

from chatpager.bench.results import TurnRecord


def _chain_hashes(ids: list[int], block_size: int) -> list[int]:
    hashes, parent = [], None
    for i in range(len(ids) // block_size):
        parent = hash((parent, tuple(ids[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def allocation_model(turns: list[TurnRecord], block_size: int, num_blocks: int, max_model_len: int,
                     max_tokens: int, kv_bytes_per_token: int) -> dict:
    last: dict[int, TurnRecord] = {}
    for t in turns:
        if t.session not in last or t.turn > last[t.session].turn:
            last[t.session] = t
    if not last:
        raise ValueError("no turns to model")
    peaks = [t.prompt_ids + t.output_ids for t in last.values()]
    n = len(peaks)
    pool_slots = num_blocks * block_size
    kind = [len(t.prompt_ids) + max_tokens for t in last.values()]
    own_blocks = [-(-len(p) // block_size) for p in peaks]
    distinct: set[int] = set()
    partial = 0  # the last, partly filled block of each session is never shared
    for p in peaks:
        distinct.update(_chain_hashes(p, block_size))
        partial += len(p) % block_size != 0
    paged_blocks = len(distinct) + partial
    per_session = {
        "contiguous_max_model_len": float(max_model_len),
        "contiguous_prompt_plus_max_tokens": statistics.fmean(kind),
        "paged_no_sharing": statistics.fmean(own_blocks) * block_size,
        "paged": paged_blocks * block_size / n,
    }
    fit = {k: int(pool_slots // v) for k, v in per_session.items()}
    workload_bytes = {
        "contiguous_max_model_len": n * max_model_len * kv_bytes_per_token,
        "contiguous_prompt_plus_max_tokens": sum(kind) * kv_bytes_per_token,
        "paged_no_sharing": sum(own_blocks) * block_size * kv_bytes_per_token,
        "paged": paged_blocks * block_size * kv_bytes_per_token,
    }
    return {
        "sessions": n,
        "pool_slots": pool_slots,
        "max_model_len": max_model_len,
        "kv_bytes_per_token": kv_bytes_per_token,
        "peak_session_tokens_mean": statistics.fmean(len(p) for p in peaks),
        "slots_per_session": per_session,
        "sessions_that_fit": fit,
        "bytes_all_sessions_at_peak": workload_bytes,
        # None where not even one session fits contiguously
        "fit_ratio_paged_vs_max_model_len": _ratio(fit["paged"], fit["contiguous_max_model_len"]),
        "fit_ratio_paged_vs_prompt_plus_max_tokens": _ratio(fit["paged"], fit["contiguous_prompt_plus_max_tokens"]),
    }
