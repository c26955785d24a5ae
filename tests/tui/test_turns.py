"""Turn control without a screen: engine events (the EngineLoop's own records) drive a Turns
whose EngineLoop is never started, so the order of events is the test's to choose."""
from __future__ import annotations

from chatpager import SamplingParams
from chatpager.engine.loop.client import EngineLoop, Rejected
from chatpager.engine.outputs import RequestOutput
from chatpager.prompts import load_prompts
from chatpager.tui.sessions import Sessions
from chatpager.tui.store import Store
from chatpager.tui.turns import Turns


def output(request_id: str, text: str, finished: bool, reason: str | None = None) -> RequestOutput:
    return RequestOutput(request_id, prompt_token_ids=(1, 2), token_ids=tuple(range(len(text))),
                         new_token_ids=(), text=text, finished=finished, finish_reason=reason)


def make_turns(tmp_path, checkpoint_interval: float = 1.0) -> Turns:
    sessions = Sessions(Store(tmp_path / "chat.sqlite3"), load_prompts())
    engine = EngineLoop(lambda progress: None, wake=lambda: None)  # commands only queue
    return Turns(sessions, engine, SamplingParams(max_tokens=8), checkpoint_interval)


def test_a_fork_of_a_reply_that_ended_empty_gets_no_reply(tmp_path):
    turns = make_turns(tmp_path)
    source = turns.sessions.create("terse")
    turns.send(source, "hi")
    fork = turns.fork(source)  # the source's reply is live: the fork branches it...
    turns.apply([output(source.request_id, "", True, "stop")])  # ...but it ends empty first
    changes = turns.apply([Rejected(fork.request_id, "no request to fork")])
    assert [(m.role, m.content) for m in fork.messages] == [("user", "hi")]
    assert not fork.busy and "ended with no text" in fork.error
    assert [n.session_id for n in changes.notices] == [fork.id]
    stored = {s.id: s for s in turns.sessions.store.load()}
    assert [m.role for m in stored[fork.id].messages] == ["user"]


def test_a_fork_of_a_reply_that_ended_first_gets_that_reply(tmp_path):
    turns = make_turns(tmp_path)
    source = turns.sessions.create("terse")
    turns.send(source, "hi")
    fork = turns.fork(source)
    turns.apply([output(source.request_id, "hello", True, "stop")])
    turns.apply([Rejected(fork.request_id, "no request to fork")])
    assert [(m.role, m.content) for m in fork.messages] == [("user", "hi"), ("assistant", "hello")]
    assert fork.error is None


def test_streaming_replies_are_checkpointed_in_the_store(tmp_path):
    turns = make_turns(tmp_path, checkpoint_interval=0.0)
    first, second = turns.sessions.create("terse"), turns.sessions.create("tutor")
    turns.send(first, "one")
    turns.send(second, "two")
    turns.apply([output(first.request_id, "Par", False), output(second.request_id, "Ti", False)])
    on_disk = {s.title: [(m.content, m.interrupted) for m in s.messages]
               for s in Store(tmp_path / "chat.sqlite3").load()}  # as after kill -9
    assert on_disk == {"Chat 1": [("one", False), ("Par", True)],
                       "Chat 2": [("two", False), ("Ti", True)]}
    turns.apply([output(first.request_id, "Partial reply", True, "stop")])
    turns.sessions.store.close()
    reopened = Sessions(Store(tmp_path / "chat.sqlite3"), turns.sessions.prompts)
    assert [(m.content, m.interrupted) for m in reopened[first.id].messages] == [
        ("one", False), ("Partial reply", False)]
    assert [(m.content, m.interrupted) for m in reopened[second.id].messages] == [
        ("two", False), ("Ti", True)]


def test_a_history_that_outgrows_the_context_drops_its_oldest_turns(tmp_path):
    turns = make_turns(tmp_path)
    session = turns.sessions.create("terse")
    for question, answer in (("q1", "a1"), ("q2", "a2")):
        turns.send(session, question)
        turns.apply([output(session.request_id, answer, True, "stop")])
    turns.send(session, "q3")
    over_context = "prompt has 9000 tokens; the model's context is 8192 and at least one must be left"
    changes = turns.apply([Rejected(session.request_id, over_context, too_long=True)])
    assert session.busy and session.error is None  # sent again, without the oldest exchange
    assert "no longer fits" in changes.notices[0].message
    assert session.chat()[0]["role"] == "system"
    assert [m["content"] for m in session.chat()[1:]] == ["q2", "a2", "q3"]
    pool = "prompt needs 600 blocks but the whole KV pool has 512; use a larger pool"
    turns.apply([Rejected(session.request_id, pool, too_long=True)])
    assert [m["content"] for m in session.chat()[1:]] == ["q3"]
    changes = turns.apply([Rejected(session.request_id, over_context, too_long=True)])  # nothing left to drop
    assert not session.busy and "context is 8192" in session.error
    assert [m.content for m in turns.sessions.store.load()[0].messages] == [
        "q1", "a1", "q2", "a2", "q3"]  # nothing lost from the store


def test_contiguous_need_compares_held_blocks_with_max_length_reservations(tmp_path):
    from chatpager.engine.outputs import CacheSnapshot, SequenceView

    turns = make_turns(tmp_path)  # max_tokens=8
    first, second = turns.sessions.create("terse"), turns.sessions.create("terse")
    turns.send(first, "one")
    turns.send(second, "two", SamplingParams(max_tokens=100))
    views = (SequenceView(first.request_id, "running", 30, 31, 30, 0, (0, 1)),
             SequenceView(second.request_id, "running", 30, 31, 30, 16, (0, 2)),
             SequenceView("someone-else", "running", 30, 31, 30, 0, (3, 4)))
    snapshot = CacheSnapshot(step=1, block_size=16, refcounts=(2, 1, 1, 1, 1), hashed=(True,) * 5,
                             free_order=(), sequences=views, stats={})
    # held: blocks 0, 1, 2 (0 shared); reserved: ceil(38 / 16) + ceil(130 / 16) = 3 + 9
    assert turns.contiguous_need(snapshot) == (3, 12)
    assert turns.contiguous_need(None) is None
