"""The batched sampler keeps the meaning of sampling one row at a time."""
from __future__ import annotations

import torch

from chatpager.engine.decoding.sampler import PREFILTER, sample_batch
from chatpager.engine.sampling_params import SamplingParams


def frequencies(draw, vocab: int, n: int) -> torch.Tensor:
    counts = torch.zeros(vocab)
    for _ in range(n):
        counts[draw()] += 1
    return counts / n


def test_greedy_rows_take_the_argmax_and_sampled_rows_stay_in_their_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=0.7, top_p=0.5), SamplingParams(temperature=1.0, top_k=50, top_p=0.3)]
    gens = [None] * 4
    for _ in range(50):
        t = sample_batch(logits, params, gens)
        assert t[0] == int(logits[0].argmax())
        assert t[1] in logits[1].topk(5).indices.tolist()
        probs = torch.softmax(logits[2] / 0.7, -1)
        order = probs.argsort(descending=True)
        nucleus = order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist()
        assert t[2] in nucleus


def test_batched_draws_follow_the_distribution_top_k_then_top_p_define():
    torch.manual_seed(1)
    vocab = 40
    logits = torch.randn(vocab) * 2
    p = SamplingParams(temperature=0.8, top_k=12, top_p=0.8)
    # the meaning, worked out by hand: renormalize over the top 12, keep the smallest set reaching 0.8
    probs = torch.zeros(vocab)
    top = (logits / 0.8).topk(12)
    in_k = torch.softmax(top.values, -1)
    keep = (in_k.cumsum(0) - in_k) <= 0.8
    probs[top.indices[keep]] = in_k[keep] / in_k[keep].sum()
    gen = torch.Generator().manual_seed(5)
    seen = frequencies(lambda: sample_batch(logits.unsqueeze(0), [p], [gen])[0], vocab, 8000)
    assert torch.equal(seen > 0, probs > 0)  # the same support
    assert (seen - probs).abs().max() < 0.03


def test_a_seeded_row_draws_the_same_whatever_it_is_batched_with():
    torch.manual_seed(2)
    logits = torch.randn(3, 500)
    p = SamplingParams(temperature=1.0, top_p=0.9)
    alone = sample_batch(logits[:1], [p], [torch.Generator().manual_seed(9)])[0]
    others = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=0.0)]
    together = sample_batch(logits, [p] + others, [torch.Generator().manual_seed(9), None, None])[0]
    assert alone == together


def test_a_flat_distribution_beyond_the_prefilter_falls_back_to_the_whole_vocabulary():
    vocab = PREFILTER * 8
    logits = torch.zeros(1, vocab)  # top_p 0.9 of a flat distribution needs 90% of the vocabulary
    gen = torch.Generator().manual_seed(0)
    picks = {sample_batch(logits, [SamplingParams(temperature=1.0, top_p=0.9)], [gen])[0] for _ in range(60)}
    assert max(picks) >= PREFILTER  # not only the first PREFILTER candidates
