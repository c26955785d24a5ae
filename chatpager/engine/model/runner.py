"""Turns a scheduled batch into flat tensors in one place, runs the model, returns logits.

Per step: input ids and positions of every new token (packed, no padding), the slot of each
(block_id * block_size + offset; never in a null entry: those lie before every position a step
computes), block tables padded to the longest, context lengths after
the step, query start offsets, and the rows whose logits are needed (sequences whose last
known token is computed this step; a prefill chunk that stops short samples nothing).
"""
from __future__ import annotations

import torch

from chatpager.engine.core.scheduler import ScheduledBatch
from chatpager.engine.model.attention import AttentionBackend, AttentionMetadata
from chatpager.engine.model.decoder import Model
from chatpager.engine.model.kv_cache import KVCache
from chatpager.engine.model.lora_layers import LoraWeights


class ModelRunner:
    def __init__(self, model: Model, kv_cache: KVCache, attention: AttentionBackend,
                 device: torch.device, lora: LoraWeights | None = None) -> None:
        self.model = model
        self.lora = lora  # the resident LoRA adapters, if any
        self.kv_cache = kv_cache
        self.attention = attention
        self.device = device
        self.block_size = kv_cache.block_size

    def run(self, batch: ScheduledBatch) -> tuple[list[int], torch.Tensor]:
        """Returns (indices into batch.seqs that need a sample, their logits [k, vocab] on CPU);
        a sequence with proposed tokens (`num_spec_tokens`) has 1 + that many rows, in order."""
        self.kv_cache.copy_blocks(batch.copies)
        input_ids, positions, slots = [], [], []
        seq_lens, starts, tables, sample_idx, logit_rows = [], [0], [], [], []
        bs = self.block_size
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            if start < seq.num_null_blocks * bs:  # would write into a released block: a bookkeeping bug
                raise RuntimeError(f"{seq.request_id}: position {start} lies in a released (null) block")
            input_ids.extend(seq.token_ids[start:end])
            pos = range(start, end)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            seq_lens.append(end)
            starts.append(starts[-1] + n)
            tables.append(table)
            if end == seq.num_tokens:
                sample_idx.append(i)
                # speculative decoding verifies each proposed token: logits at every one of them
                logit_rows.extend(range(starts[-1] - 1 - seq.num_spec_tokens, starts[-1]))
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        )
        self.attention.plan(meta, bs)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        lora = None if self.lora is None else self.lora.batch([s.params.lora for s in batch.seqs],
                                                              batch.num_tokens, dev)
        hidden = self.model.forward(ids, pos_t, self.kv_cache, meta, self.attention, lora=lora)
        if not sample_idx:
            return [], hidden.new_empty(0)
        rows = torch.tensor(logit_rows, device=dev)
        return sample_idx, self.model.logits(hidden[rows]).cpu()
