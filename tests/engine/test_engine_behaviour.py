"""Prefix caching, copy-on-write forks, parallel samples, continuous batching and abort,
driven through the step-level API on a tiny random-weight model."""
from __future__ import annotations

import random

import pytest

from chatpager import LLM, SamplingParams
from tests.oracles import hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(250) for _ in range(n)]


def run_all(engine) -> dict:
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


@pytest.fixture
def llm(tiny_llama):
    return LLM(model=tiny_llama, block_size=16)


def test_repeated_prompt_computes_only_its_uncached_tail(llm):
    p = prompt(0, 100)
    first = llm.generate([p], GREEDY)[0]
    assert first.num_cached_tokens == 0
    before = llm.stats()
    second = llm.generate([p], GREEDY)[0]
    after = llm.stats()
    # 6 full blocks are hits, and 3 leading tokens of the 7th (copied below block granularity);
    # the last token is always computed
    assert second.num_cached_tokens == 99
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] == 99
    assert after["prefix_query_tokens"] - before["prefix_query_tokens"] == 100
    assert second.token_ids == first.token_ids


def test_generated_tokens_are_cached_for_the_next_turn(llm):
    p = prompt(1, 40)
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    turn2 = p + list(out.token_ids) + prompt(2, 10)
    second = llm.generate([turn2], GREEDY)[0]
    # the prompt and all but the last generated token were computed: 69 tokens, 4 full blocks
    # and 5 in the finished turn's last block, which the next turn takes over
    assert second.num_cached_tokens == 69


def test_shared_system_prompt_is_shared_across_running_requests(llm):
    system = prompt(3, 64)
    eng = llm.engine
    eng.add_request(system + prompt(4, 5), GREEDY)
    eng.step()  # the first request's prefill registers the system prompt's blocks
    eng.add_request(system + prompt(5, 9), GREEDY)
    eng.step()
    stats = llm.stats()
    assert stats["shared_blocks"] == 4
    assert stats["sharing_ratio"] > 1.0
    run_all(eng)
    assert llm.stats()["free_blocks"] == llm.stats()["num_blocks"]


def test_fork_copies_on_write_and_neither_branch_disturbs_the_other(tiny_llama, hf_reference):
    llm = LLM(model=tiny_llama, block_size=16)
    eng = llm.engine
    p = prompt(6, 20)
    a = eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    for _ in range(3):  # prefill + 2 decodes: 22 tokens held, the last block partly full
        eng.step()
    at_fork = list(eng.seqs[a].token_ids)
    b = eng.fork(a, params=SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))
    assert llm.stats()["shared_blocks"] == 2
    final = run_all(eng)
    assert llm.stats()["cow_copies"] >= 1
    # branch a is exactly the solo greedy run: b's writes never reached a's blocks
    assert list(final[a].token_ids) == hf_greedy(hf_reference(tiny_llama), p, 20, ignore_eos=True)
    # branch b equals a fresh request continuing from the fork point with the same sampler
    fresh = LLM(model=tiny_llama, block_size=16).generate(
        [at_fork], SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))[0]
    assert list(final[b].token_ids)[len(at_fork) - len(p):] == list(fresh.token_ids)


def test_parallel_samples_share_the_prompt_blocks(llm):
    eng = llm.engine
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=3, n=3, max_tokens=12, ignore_eos=True)
    rid = eng.add_request(prompt(8, 50), params)
    eng.step()  # prefill, then the two siblings fork off the prompt's blocks
    assert set(eng.seqs) == {rid, f"{rid}.1", f"{rid}.2"}
    assert llm.stats()["shared_blocks"] == 4  # 50 prompt tokens + 1: four blocks, all shared 3 ways
    run_all(eng)
    out = llm.generate([prompt(8, 50)], params)[0]
    assert len(out.samples) == 3
    assert len({s.token_ids for s in out.samples}) > 1  # different seeds, different samples
    assert all(len(s.token_ids) == 12 for s in out.samples)


def test_greedy_parallel_samples_are_identical(llm):
    out = llm.generate([prompt(9, 20)], SamplingParams(temperature=0.0, n=2, max_tokens=8, ignore_eos=True))[0]
    assert out.samples[0].token_ids == out.samples[1].token_ids == out.token_ids


def test_new_requests_join_the_running_batch_and_finished_ones_leave(llm):
    eng = llm.engine
    long_req = eng.add_request(prompt(10, 10), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    eng.step()
    eng.step()
    short_req = eng.add_request(prompt(11, 10), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    outs = {o.request_id: o for o in eng.step()}
    assert set(outs) == {long_req, short_req}  # joined at the very next step
    outs = {o.request_id: o for o in eng.step()}
    assert outs[short_req].finished and outs[short_req].finish_reason == "length"
    assert llm.stats()["running"] == 1
    assert {o.request_id for o in eng.step()} == {long_req}


def test_abort_frees_blocks_at_once(llm):
    eng = llm.engine
    rid = eng.add_request(prompt(12, 40), SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    eng.step()
    assert llm.stats()["used_blocks"] == 3
    eng.abort(rid)
    assert llm.stats()["used_blocks"] == 0
    outs = eng.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "abort")]
    assert not eng.has_unfinished()


def test_stop_strings_and_eos(tiny_llama):
    llm = LLM(model=tiny_llama)
    free = llm.generate([prompt(13, 8)], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0]
    stop = free.text[5:7]
    cut = llm.generate([prompt(13, 8)], SamplingParams(temperature=0.0, max_tokens=40, stop=[stop],
                                                       ignore_eos=True))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.find(stop)]


def test_kv_utilization_counts_filled_slots(llm):
    eng = llm.engine
    eng.add_request(prompt(14, 24), GREEDY)  # 24 tokens in 2 blocks of 16
    eng.step()
    assert llm.stats()["kv_utilization"] == pytest.approx(24 / 32)



def test_cache_salt_isolates_tenants(llm):
    p = prompt(15, 70)
    eng = llm.engine
    hits = {}
    for rid, salt in (("a1", "tenant-a"), ("b1", "tenant-b"), ("a2", "tenant-a"), ("n1", None), ("b2", "tenant-b")):
        eng.add_request(p, GREEDY, request_id=rid, cache_salt=salt)
        hits[rid] = run_all(eng)[rid].num_cached_tokens
    # different salts (None included) never share; the same salt does
    assert hits["a1"] == hits["b1"] == hits["n1"] == 0
    assert hits["a2"] > 0 and hits["b2"] > 0
    assert llm.generate([p], GREEDY, cache_salt="tenant-a")[0].num_cached_tokens > 0
    assert llm.generate([p], GREEDY, cache_salt="tenant-c")[0].num_cached_tokens == 0


def test_block_keys_are_sha256_chains_over_salt_and_tokens():
    from chatpager.engine.core.block_keys import block_key, root_key

    root = root_key("m", "salt")
    assert len(root) == 32 and root != root_key("m", None) != root_key("other", "salt")
    k1 = block_key(root, [1, 2, 3, 4])
    assert k1 == block_key(root_key("m", "salt"), [1, 2, 3, 4])
    assert k1 != block_key(root, [1, 2, 3, 5]) and k1 != block_key(root_key("m", None), [1, 2, 3, 4])
    # the parent enters the key: the same tokens after a different chain give another key
    assert block_key(k1, [1, 2, 3, 4]) != k1


def finished_once(outputs) -> dict:
    """request id -> finish reason, asserting each request finished exactly once."""
    seen = {}
    for out in outputs:
        if out.finished:
            assert out.request_id not in seen, f"{out.request_id} finished twice"
            seen[out.request_id] = out.finish_reason
    return seen


def drain(engine) -> list:
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


@pytest.mark.parametrize("abort_ids", ["leader", "every id"])
def test_aborting_a_group_before_its_prefill_ends_reports_every_sample_once(tiny_llama, abort_ids):
    llm = LLM(model=tiny_llama, block_size=16, max_num_batched_tokens=16)
    eng = llm.engine
    params = SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=8, ignore_eos=True)
    rid = eng.add_request(prompt(16, 50), params)  # 50 tokens in chunks of 16: 4 prefill steps
    outs = eng.step()
    assert outs == [] and eng.seqs[rid].num_computed_tokens == 16
    for request_id in [rid] if abort_ids == "leader" else [rid, f"{rid}.1", f"{rid}.2"]:
        eng.abort(request_id)
    reasons = finished_once(drain(eng))
    assert reasons == {rid: "abort", f"{rid}.1": "abort", f"{rid}.2": "abort"}
    assert llm.stats()["free_blocks"] == llm.stats()["num_blocks"]


def test_aborting_one_sample_leaves_its_siblings_running(llm):
    eng = llm.engine
    rid = eng.add_request(prompt(17, 20), SamplingParams(temperature=1.0, seed=2, n=3, max_tokens=6,
                                                         ignore_eos=True))
    eng.step()
    eng.abort(f"{rid}.1")
    reasons = finished_once(drain(eng))
    assert reasons == {rid: "length", f"{rid}.1": "abort", f"{rid}.2": "length"}


@pytest.mark.parametrize("fail_at_step", [1, 3])  # during the prompt's prefill / after the samples forked
def test_a_failed_forward_fails_every_sample_once_and_is_logged(tiny_llama, caplog, fail_at_step):
    llm = LLM(model=tiny_llama, block_size=16)
    eng = llm.engine
    run, calls = eng.runner.run, []

    def flaky(batch):
        calls.append(len(batch))
        if len(calls) == fail_at_step:
            raise RuntimeError("device lost")
        return run(batch)

    eng.runner.run = flaky
    rid = eng.add_request(prompt(18, 30), SamplingParams(temperature=0.0, n=3, max_tokens=10, ignore_eos=True))
    with caplog.at_level("ERROR", logger="chatpager.engine"):
        outs = drain(eng)
    assert finished_once(outs) == {rid: "error", f"{rid}.1": "error", f"{rid}.2": "error"}
    assert all(o.error == "RuntimeError: device lost" for o in outs if o.finished)
    failure = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(failure) == 1 and failure[0].exc_info and "device lost" in str(failure[0].exc_info[1])
    assert llm.stats()["free_blocks"] == llm.stats()["num_blocks"]
    # the engine keeps serving
    assert llm.generate([prompt(19, 10)], GREEDY)[0].finish_reason == "length"


def test_requests_admitted_together_share_their_common_prefix_from_the_first_step(tiny_llama, hf_reference):
    system = prompt(20, 64)  # four full blocks
    prompts = [system + prompt(21 + i, 7) for i in range(4)]
    llm = LLM(model=tiny_llama, block_size=16)
    eng = llm.engine
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    first = {o.request_id: o for o in eng.step()}  # all four prefill in this one step
    assert set(first) == set(ids)
    # the prefix was computed once: the other three hit its blocks in the same step
    assert [first[i].num_cached_tokens for i in ids] == [0, 64, 64, 64]
    assert llm.stats()["prefix_hit_tokens"] == 3 * 64
    tables = [eng.seqs[i].block_table for i in ids]
    assert all(t[:4] == tables[0][:4] for t in tables)
    assert [eng.pool.blocks[b].ref_cnt for b in tables[0][:4]] == [4, 4, 4, 4]
    assert llm.stats()["used_blocks"] == 4 + 4  # the shared prefix + one own block each
    final = run_all(eng)
    alone = LLM(model=tiny_llama, block_size=16, enable_prefix_caching=False).generate(prompts, GREEDY)
    assert [final[i].token_ids for i in ids] == [o.token_ids for o in alone]
    hf = hf_reference(tiny_llama)
    assert [list(final[i].token_ids) for i in ids] == [hf_greedy(hf, p, 16, ignore_eos=True) for p in prompts]


@pytest.mark.slow
def test_default_model_chats_sent_together_share_the_system_prompt(default_llm, hf_reference):
    # greedy equality with transformers: safe, the two best logits are >= 0.025 apart along these
    # 8-token replies, the implementations' logits <= 6e-5 (AMD EPYC, 2026-12-04)
    llm = default_llm
    system = {"role": "system", "content": "You are a patient tutor. " * 20}
    convs = [[system, {"role": "user", "content": q}] for q in ("What is 2 + 2?", "Name a color.", "Say hi.")]
    before = llm.stats()["prefix_hit_tokens"]
    outs = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=8), cache_salt="same-step-test")
    shared = min(len(llm.encode_chat(c)) for c in convs) // 16 * 16 - 16  # whole blocks of the system turn
    assert all(o.num_cached_tokens >= shared for o in outs[1:]) and outs[0].num_cached_tokens == 0
    assert llm.stats()["prefix_hit_tokens"] - before >= 2 * shared
    hf = hf_reference(llm.model_info["path"])
    assert [list(o.token_ids) for o in outs] == [hf_greedy(hf, llm.encode_chat(c), 8) for c in convs]


def test_forks_and_samples_respect_max_num_seqs(tiny_llama):
    llm = LLM(model=tiny_llama, block_size=16, max_num_seqs=2)
    eng = llm.engine
    rid = eng.add_request(prompt(22, 20), SamplingParams(temperature=0.0, n=3, max_tokens=6, ignore_eos=True))
    outs = []
    while eng.has_unfinished():
        outs.extend(eng.step())
        assert llm.stats()["running"] <= 2
    final = finished_once(outs)  # no sample is lost: the one without room waited its turn
    assert final == {rid: "length", f"{rid}.1": "length", f"{rid}.2": "length"}
    samples = {o.request_id: o.token_ids for o in outs if o.finished}
    assert samples[rid] == samples[f"{rid}.1"] == samples[f"{rid}.2"]  # greedy: the queued one too


def test_an_explicit_fork_beyond_max_num_seqs_waits_its_turn(tiny_llama):
    llm = LLM(model=tiny_llama, block_size=16, max_num_seqs=1)
    eng = llm.engine
    a = eng.add_request(prompt(23, 20), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    eng.step()
    b = eng.fork(a)
    assert llm.stats()["running"] == 1 and llm.stats()["waiting"] == 1
    final = run_all(eng)
    # greedy: the fork (1 inherited + 6 own tokens) continues exactly as its parent did
    assert final[b].token_ids[:6] == final[a].token_ids and len(final[b].token_ids) == 7


def test_swap_mode_counts_swaps(tiny_llama):
    llm = LLM(model=tiny_llama, block_size=4, num_blocks=24, preemption_mode="swap")
    llm.generate([prompt(24 + i, 30) for i in range(5)], SamplingParams(temperature=0.0, max_tokens=30,
                                                                        ignore_eos=True))
    stats = llm.stats()
    assert stats["preemptions"] > 0 and stats["swap_outs"] > 0 and stats["swap_ins"] == stats["swap_outs"]


def test_file_logging_records_a_failed_forward_with_its_traceback(tiny_llama, tmp_path):
    import logging

    from chatpager.logs import configure_file_logging

    log_file = tmp_path / "logs" / "chatpager.log"
    handler = configure_file_logging(log_file)
    try:
        assert configure_file_logging(log_file) is handler  # idempotent
        llm = LLM(model=tiny_llama)

        def broken(batch):
            raise MemoryError("no room for activations")

        llm.engine.runner.run = broken
        out = llm.generate([prompt(29, 5)], GREEDY)[0]
        assert out.finish_reason == "error"
        handler.flush()
        text = log_file.read_text()
        assert "forward failed" in text and "Traceback (most recent call last)" in text
        assert "MemoryError: no room for activations" in text
    finally:
        logging.getLogger("chatpager").removeHandler(handler)
        handler.close()


def test_reuse_below_block_granularity_keeps_greedy_tokens(tiny_llama):
    base = prompt(30, 40)
    variants = [base[:20] + prompt(31, 9),  # diverges inside a cached full block: its slots are copied
                base + prompt(32, 5),  # extends the finished turn's partly filled last block
                base[:37] + prompt(33, 6)]  # diverges inside that partial block
    llm = LLM(model=tiny_llama, block_size=16)
    first = llm.generate([base], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert first.num_cached_tokens == 0  # 43 tokens computed: 2 full blocks + 11 in the third
    outs = [llm.generate([v], GREEDY)[0] for v in variants]
    assert [o.num_cached_tokens for o in outs] == [20, 40, 37]
    alone = LLM(model=tiny_llama, block_size=16, enable_prefix_caching=False).generate(variants, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert llm.stats()["free_blocks"] == llm.stats()["num_blocks"]


def test_a_chat_turn_hits_its_whole_computed_history(tiny_llama):
    llm = LLM(model=tiny_llama, block_size=16)
    history = prompt(34, 50)
    for turn in range(4):
        out = llm.generate([history], SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True))[0]
        if turn:  # everything but the newest user message was computed by the previous turn
            assert out.num_cached_tokens == len(history) - 6
        history = history + list(out.token_ids) + prompt(35 + turn, 5)


def test_bad_salts_and_sample_id_clashes_are_rejected_without_side_effects(llm):
    from chatpager.errors import RequestError

    eng = llm.engine
    with pytest.raises(RequestError, match="cache_salt must be a string"):
        eng.add_request(prompt(40, 5), GREEDY, cache_salt=42)
    eng.add_request(prompt(41, 5), GREEDY, request_id="x.1")
    with pytest.raises(RequestError, match="'x.1'"):  # would be the second sample of "x"
        eng.add_request(prompt(42, 5), SamplingParams(n=2, max_tokens=2), request_id="x")
    assert set(eng.seqs) == {"x.1"}
    assert set(run_all(eng)) == {"x.1"}
