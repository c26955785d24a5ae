"""Beam search on copy-on-write blocks, inside the continuous-batching step.

A beam request is a RequestGroup of `beam_width` slots (request ids `<id>`, `<id>.1` ...), each
slot a Sequence that the scheduler runs like any decode. Each step that every live beam of a
group has fresh logits, the group advances once: the top `2 x beam_width` continuations over
all beams are ranked by cumulative log-probability (transformers' rule, see BeamState); a beam
kept by several continuations forks (block refcounts go up, nothing is copied); a beam kept by
none ends and frees its blocks. The next forward writes each beam's new token; the block
manager copies a shared, partly filled last block first (copy on write), so the pool holds
the prompt once plus the beams' distinct tails.

Invariants:
- A group advances only when all its live beams have logits for their newest token (a beam
  preempted meanwhile recomputes first; the others wait with nothing to compute).
- Slots are replaced, never added: the group always has the members the engine can abort or
  fail as a whole (`RequestGroup.members`), and a replaced slot's Sequence is finished and
  its blocks freed before the new one forks its parent.
- The request reports once, through its leader id, when the search ends (`samples` are the
  finished hypotheses, best first); its slots end silently.
What it may do to the engine: only what its `EngineHost` offers (decoding/host.py): make and
queue its leader, attach forked slots, rename and release slots, decode text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chatpager.engine.core.request import RequestGroup, Sequence
from chatpager.engine.decoding.host import EngineHost
from chatpager.engine.outputs import RequestOutput, Sample
from chatpager.engine.sampling_params import BeamSearchParams, SamplingParams
from chatpager.errors import RequestError

NEG_INF = -1.0e9  # transformers' "impossible" score, kept so comparisons match its own


@dataclass(frozen=True, slots=True)
class BeamSequence:
    token_ids: tuple[int, ...]
    text: str
    cum_logprob: float  # sum of the tokens' log-probabilities
    score: float  # cum_logprob / len(token_ids) ** length_penalty: what ranks the sequences
    finish_reason: str  # "stop" (ended with EOS) or "length"


@dataclass(frozen=True, slots=True)
class BeamSearchOutput:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sequences: tuple[BeamSequence, ...]  # best first
    finish_reason: str  # "stop" (the search ended), "abort" or "error"


@dataclass(slots=True)
class Hypothesis:
    token_ids: tuple[int, ...]  # generated tokens, EOS included
    cum_logprob: float
    score: float
    eos: bool


@dataclass(slots=True, eq=False)
class BeamState:
    """The search state of one group, kept the way transformers' `_beam_search` keeps it:
    `running` beams ordered best first with their cumulative log-probabilities, up to
    `beam_width` finished hypotheses, and the early-stop flag."""

    params: BeamSearchParams
    group: RequestGroup
    running: list[Sequence]
    cum: torch.Tensor  # float32 [len(running)], as transformers accumulates
    finished: list[Hypothesis] = field(default_factory=list)
    can_improve: bool = True
    logprobs: dict[Sequence, torch.Tensor] = field(default_factory=dict)  # fresh rows, by beam
    num_generated: int = 0


class BeamSearcher:
    """The engine's beam groups. `add` queues one; `take_rows` advances the groups whose beams
    all have logits this step and returns the rows that are not theirs."""

    def __init__(self, host: EngineHost) -> None:
        self.host = host
        self.states: dict[RequestGroup, BeamState] = {}
        self.results: dict[str, BeamSearchOutput] = {}  # finished searches, by request id
        self._next_slot = 0

    def owns(self, seq: Sequence) -> bool:
        return seq.group is not None and seq.group in self.states

    def add(self, prompt: str | list[int], params: BeamSearchParams, request_id: str | None = None,
            cache_salt: str | None = None) -> str:
        host = self.host
        greedy = SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos)
        leader = host.make(prompt, greedy, request_id, cache_salt)
        clash = [f"{leader.request_id}.{j}" for j in range(1, params.beam_width)
                 if host.is_live(f"{leader.request_id}.{j}")]
        if clash:
            raise RequestError(f"request id {clash[0]!r} (a beam of {leader.request_id!r}) is already in use")
        group = RequestGroup(leader)
        leader.group = group
        self.states[group] = BeamState(params, group, [leader], torch.zeros(1))
        host.queue(leader)
        return leader.request_id

    # --- the step ------------------------------------------------------------------------
    def take_rows(self, rows: list[tuple[int, Sequence]], logits: torch.Tensor) -> tuple[
            list[tuple[int, Sequence]], list[RequestOutput]]:
        """Consume the logits rows of beam slots; returns the other rows and the outputs of
        searches that ended."""
        if not self.states:
            return rows, []
        rest, touched = [], []
        for row, seq in rows:
            state = self.states.get(seq.group) if seq.group is not None else None
            if state is None:
                rest.append((row, seq))
                continue
            state.logprobs[seq] = torch.log_softmax(logits[row].float(), dim=-1)
            if state not in touched:
                touched.append(state)
        outputs = []
        for state in touched:
            if all(b in state.logprobs for b in state.running):
                if self._advance(state):
                    outputs.append(self._finish(state, "stop"))
        self._forget_ended()
        return rest, outputs

    def _advance(self, state: BeamState) -> bool:
        """One step of transformers' beam search for this group; True when the search ends."""
        p, k = state.params, state.params.beam_width
        eos = set() if p.ignore_eos else self.host.eos_token_ids
        rows = torch.stack([state.logprobs.pop(b) for b in state.running])
        vocab = rows.shape[1]
        scores = (rows + state.cum[:, None]).reshape(-1)
        keep = min(max(2, 1 + len(eos)) * k, scores.numel())
        top, idx = torch.topk(scores, keep)
        beams, tokens = (idx // vocab).tolist(), (idx % vocab).tolist()
        length = state.num_generated + 1
        seq0 = state.running[0]
        at_limit = length >= p.max_tokens or seq0.num_tokens + 1 >= seq0.max_len
        hits = [at_limit or t in eos for t in tokens]
        # finished hypotheses: only candidates ranked within the top beam_width may finish
        full = len(state.finished) == k and p.early_stopping is True
        if state.can_improve and not full:
            penalized = top / (length ** p.length_penalty)
            for j in range(min(k, keep)):
                if hits[j]:
                    parent = state.running[beams[j]]
                    state.finished.append(Hypothesis(
                        tuple(parent.output_token_ids) + (tokens[j],), float(top[j]), float(penalized[j]),
                        tokens[j] in eos))
            state.finished.sort(key=lambda h: -h.score)
            del state.finished[k:]
        state.num_generated = length
        if all(hits):
            return True
        chosen = [j for j in range(keep) if not hits[j]][:k]
        self._regroup(state, [(beams[j], tokens[j]) for j in chosen])
        state.cum = top[chosen].clone()
        if state.can_improve and len(state.finished) == k:
            hyp_len = p.max_tokens if (p.early_stopping == "never" and p.length_penalty > 0) else length
            best = float(state.cum[0] / (hyp_len ** p.length_penalty))
            state.can_improve = best > min(h.score for h in state.finished)
        return not state.can_improve or (len(state.finished) == k and p.early_stopping is True)

    def _regroup(self, state: BeamState, picks: list[tuple[int, int]]) -> None:
        """Make the running beams the picked (parent beam, token) continuations, best first:
        a parent's first pick keeps its slot, the others fork it into the slots of beams that
        no pick continues (or new slots while the group is growing)."""
        host, old = self.host, state.running
        first: dict[int, int] = {}
        for i, (b, _) in enumerate(picks):
            first.setdefault(b, i)
        free_slots = [s for b, s in enumerate(old) if b not in first]
        for s in free_slots:
            host.release(s)  # the scheduler drops it lazily
        leader_id = state.group.leader.request_id
        # the leader's id is reused first, so the request id always names a live slot
        slot_ids = sorted((s.request_id for s in free_slots), key=lambda i: (i != leader_id, len(i), i))
        taken = {s.request_id for s in old} - set(slot_ids)
        j = 1
        while len(slot_ids) < len(picks) - len(first):  # the group grows (its first step)
            if f"{leader_id}.{j}" not in taken:
                slot_ids.append(f"{leader_id}.{j}")
            j += 1
        new_running: list[Sequence] = []
        forks: list[tuple[Sequence, int]] = []
        for i, (b, token) in enumerate(picks):
            parent = old[b]
            if first[b] == i:
                new_running.append(parent)
                continue
            child = Sequence(slot_ids.pop(0), parent.token_ids[:parent.num_prompt_tokens], parent.params,
                             parent.max_len, parent_id=leader_id, cache_salt=parent.cache_salt)
            child.continue_from(parent)  # shares the parent's state before its own token lands
            child.group = state.group
            host.attach(parent, child)
            forks.append((child, token))
            new_running.append(child)
        for i, (b, token) in enumerate(picks):
            if first[b] == i:
                old[b].token_ids.append(token)
        for child, token in forks:
            child.token_ids.append(token)
        state.running = new_running
        self._rebuild_members(state)

    def _rebuild_members(self, state: BeamState) -> None:
        """The group's members are the running slots; the leader keeps the request id."""
        group, leader_id = state.group, state.group.leader.request_id
        leader = next((s for s in state.running if s.request_id == leader_id), None)
        if leader is None:  # the leader's slot was dropped, not reused: a running slot takes its id
            leader = state.running[0]
            self.host.rename(leader, leader_id)
        group.leader = leader
        group.samples = [s for s in state.running if s is not leader]

    # --- ending --------------------------------------------------------------------------
    def _finish(self, state: BeamState, reason: str) -> RequestOutput:
        """End every slot of the group and report the hypotheses, best first."""
        host, p = self.host, state.params
        hyps = state.finished or [
            Hypothesis(tuple(b.output_token_ids), float(c), float(c) / max(1, len(b.output_token_ids))
                       ** p.length_penalty, False) for b, c in zip(state.running, state.cum.tolist())]
        leader = state.group.leader
        request_id = state.group.leader.request_id
        for seq in state.running:
            host.release(seq, reason)
        del self.states[state.group]
        seqs = tuple(BeamSequence(h.token_ids, host.decode(list(h.token_ids)),
                                  h.cum_logprob, h.score, "stop" if h.eos else "length") for h in hyps)
        prompt = tuple(leader.token_ids[:leader.num_prompt_tokens])
        self.results[request_id] = BeamSearchOutput(request_id, prompt, seqs, reason)
        best = seqs[0]
        return RequestOutput(
            request_id=request_id, prompt_token_ids=prompt, token_ids=best.token_ids, new_token_ids=(),
            text=best.text, finished=True, finish_reason=best.finish_reason,
            num_cached_tokens=leader.num_cached_tokens,
            samples=tuple(Sample(f"{request_id}#{i}", s.token_ids, s.text, s.finish_reason)
                          for i, s in enumerate(seqs)))

    def result(self, request_id: str) -> BeamSearchOutput | None:
        """The outcome of a search that ended (once: it is handed over, not kept)."""
        self._forget_ended()
        return self.results.pop(request_id, None)

    def _forget_ended(self) -> None:
        """Drop the state of groups the engine ended (abort, failed forward): their members
        already reported."""
        for group, state in list(self.states.items()):
            if all(s.is_finished for s in state.running):
                del self.states[group]
                leader = group.leader
                self.results[leader.request_id] = BeamSearchOutput(
                    leader.request_id, tuple(leader.token_ids[:leader.num_prompt_tokens]), (),
                    leader.finish_reason or "abort")
