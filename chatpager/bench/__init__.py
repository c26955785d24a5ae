"""`chatpager bench`: a seeded multi-tenant chat workload run on chatpager's engine and on
transformers' `generate`, with the memory a contiguous KV cache would need for it.

workload (sessions, turns, messages) → chatpager_runner / transformers_runner (RunResult per
turn) → contiguous (allocation model) → report (figures, goals, table) → plot. cli wires them.
"""
