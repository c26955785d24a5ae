"""Turn a step's logits into tokens: greedy, or temperature / top-k / top-p sampling, for the
whole batch at once.

`sample_batch` keeps the meaning of sampling one row at a time (the reference `sample`): top-k
first, then the smallest set of the most likely tokens whose mass reaches top_p, then a draw
from what is left, renormalized. How, without sorting the vocabulary for every row:
- one argmax for all greedy rows;
- one `topk` for the sampled rows, of the largest top_k asked; a row without a top_k takes the
  best `PREFILTER` tokens, enough whenever they already hold top_p of the mass (checked per row;
  a row where they do not, or with neither top_k nor top_p, samples over the whole vocabulary);
- each row draws one uniform number from its own generator (seeded requests reproduce whatever
  they are batched with) and inverts its cumulative distribution.
"""
from __future__ import annotations

import torch

from chatpager.engine.core.request import Sequence
from chatpager.engine.sampling_params import SamplingParams

PREFILTER = 256  # candidates before top-p for a row that sets no top_k


def generator_for(seq: Sequence) -> torch.Generator | None:
    """A seeded request's own random stream (None: torch's global one), made at its first draw
    and kept on the sequence: the sampler is the only code that makes or reads it."""
    if seq.generator is None and seq.params.seed is not None:
        seq.generator = torch.Generator().manual_seed(seq.params.seed)
    return seq.generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One row, the plain way: logits [vocab] float32 on CPU. The meaning `sample_batch` keeps."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest set whose mass reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs > params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """logits [rows, vocab] float32 on CPU; one token per row."""
    tokens = logits.argmax(-1).tolist()
    vocab = logits.shape[-1]
    rows = []  # rows that sample from a truncated distribution, batched below
    for i, p in enumerate(params):
        if p.greedy:
            continue
        if 0 < p.top_k < vocab or p.top_p < 1.0:
            rows.append(i)
        else:  # plain temperature sampling: the whole vocabulary anyway
            tokens[i] = sample(logits[i], p, generators[i])
    if not rows:
        return tokens
    ps = [params[i] for i in rows]
    x = logits[rows] / torch.tensor([p.temperature for p in ps], dtype=logits.dtype).unsqueeze(1)
    has_k = torch.tensor([0 < p.top_k < vocab for p in ps])
    wants = torch.tensor([p.top_k if 0 < p.top_k < vocab else PREFILTER for p in ps])
    width = min(int(wants.max()), vocab)
    vals, idx = x.topk(width, dim=-1)  # sorted, best first
    vals = vals.masked_fill(torch.arange(width) >= wants.unsqueeze(1), float("-inf"))
    # top-k rows renormalize over their k; the others over the whole vocabulary
    norm = torch.where(has_k, torch.logsumexp(vals, -1), torch.logsumexp(x, -1))
    probs = torch.exp(vals - norm.unsqueeze(1))
    cum = probs.cumsum(-1)
    top_p = torch.tensor([p.top_p for p in ps], dtype=probs.dtype).unsqueeze(1)
    probs = probs.masked_fill(cum - probs > top_p, 0.0)  # the smallest set reaching top_p stays
    kept = probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(kept.dtype) * kept[:, -1]
    pick = torch.searchsorted(kept, u.unsqueeze(1), right=True).squeeze(1)
    pick = torch.minimum(pick, (probs > 0).sum(-1) - 1)  # kept tokens are a prefix; u may round up
    chosen = idx.gather(1, pick.unsqueeze(1)).squeeze(1).tolist()
    # a row without top_k whose candidates hold less than its top_p: they were not enough
    short = ((~has_k) & (cum[:, -1] < top_p[:, 0]) & (width < vocab)).tolist()
    for j, row in enumerate(rows):
        tokens[row] = sample(logits[row], ps[j], generators[row]) if short[j] else chosen[j]
    return tokens
