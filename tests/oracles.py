"""The independent oracles the tests compare chatpager with: transformers on the same weights."""
from __future__ import annotations

import pytest
import torch

from chatpager import LLM
from chatpager.engine.sampling_params import BeamSearchParams


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt (generated tokens only)."""
    ids = torch.tensor([prompt_ids])
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    if ignore_eos:
        kwargs.update(eos_token_id=None, min_new_tokens=max_new_tokens)
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def hf_beams(hf, prompt: list[int], params: BeamSearchParams, eos: list[int]) -> tuple[list[list[int]], list[float]]:
    """transformers' returned hypotheses (generated tokens, cut after EOS) and their scores."""
    ids = torch.tensor([prompt])
    k = params.beam_width
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=k,
                          num_return_sequences=k, max_new_tokens=params.max_tokens,
                          length_penalty=params.length_penalty, early_stopping=params.early_stopping,
                          eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
    seqs = []
    for row in out.sequences.tolist():
        gen = row[len(prompt):]
        ends = [i for i, t in enumerate(gen) if t in eos]
        seqs.append(gen[:ends[0] + 1] if ends else gen)
    return seqs, out.sequences_scores.tolist()


def assert_matches_hf(llm: LLM, hf, prompts: list[list[int]], params: BeamSearchParams) -> None:
    eos = sorted(llm.engine.eos_token_ids)
    outs = llm.beam_search(prompts, params)
    assert len(outs) == len(prompts)
    for prompt, out in zip(prompts, outs):
        want, scores = hf_beams(hf, prompt, params, eos)
        got = [list(s.token_ids) for s in out.sequences]
        assert got[0] == want[0]  # the best beam, token for token
        assert got == want
        assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-4)
        assert list(out.prompt_token_ids) == prompt
