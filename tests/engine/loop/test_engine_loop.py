"""EngineLoop: the engine in its own core (a thread, or a process of its own), driven through
commands and read through events."""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time

import pytest
import torch

from chatpager import SamplingParams
from chatpager.engine.loop.client import Accepted, EngineFailed, EngineLoop, Loaded, LoadFailed, LoadProgress, Rejected
from chatpager.engine.loop.core import load_llm
from chatpager.engine.loop.protocol import Held
from chatpager.engine.outputs import RequestOutput
from chatpager.errors import ChatpagerError

CHAT = [{"role": "user", "content": "hello"}]


class Collector:
    """Drains the loop whenever it is woken, the way the app does."""

    def __init__(self) -> None:
        self.events: list = []
        self.woken = threading.Event()

    def wake(self) -> None:
        self.woken.set()

    def pump(self, loop: EngineLoop, until, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out waiting on the engine loop"
            self.woken.wait(0.05)
            self.woken.clear()
            self.events.extend(loop.drain())

    def finals(self) -> dict[str, RequestOutput]:
        return {e.request_id: e for e in self.events if isinstance(e, RequestOutput) and e.finished}

    def latest(self, request_id: str) -> RequestOutput:
        return [e for e in self.events if isinstance(e, RequestOutput) and e.request_id == request_id][-1]


def hold(loop: EngineLoop, steps: int = 0, timeout: float = 30.0) -> int:
    """`loop.hold(steps)`, waited on without draining; the engine's step count then."""
    loop.hold(steps)
    deadline = time.monotonic() + timeout
    while not loop.held:
        assert time.monotonic() < deadline, "the engine loop did not hold"
        time.sleep(0.002)
    return loop.snapshot.stats["steps"]


def start_loop(model: str, process: bool) -> tuple[EngineLoop, Collector]:
    """A loop on `model`, its core on a thread or in a process of its own."""
    collector = Collector()
    loop = EngineLoop(functools.partial(load_llm, {"model": model, "num_blocks": 32}),
                      wake=collector.wake, snapshot_interval=0.01, process=process)
    loop.start()
    return loop, collector


@pytest.fixture(params=["thread", "process"])
def started(request, tiny_llama):
    loop, collector = start_loop(tiny_llama, process=request.param == "process")
    yield loop, collector
    loop.close()


def test_commands_queued_before_the_model_loads_are_served(started):
    loop, collector = started
    loop.submit("a", CHAT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    collector.pump(loop, lambda: "a" in collector.finals())
    kinds = [type(e) for e in collector.events]
    assert kinds.index(LoadProgress) < kinds.index(Loaded) < kinds.index(RequestOutput)
    final = collector.finals()["a"]
    assert len(final.token_ids) == 8 and final.finish_reason == "length"
    assert loop.model_info["device"] == "cpu"


def test_a_core_process_runs_on_the_threads_it_is_given(tiny_llama):
    collector = Collector()
    threads = 3 if torch.get_num_threads() != 3 else 2
    loop = EngineLoop(functools.partial(load_llm, {"model": tiny_llama, "num_blocks": 8}, threads=threads),
                      wake=collector.wake, process=True)
    loop.start()
    collector.pump(loop, lambda: loop.ready)
    assert loop.model_info["threads"] == threads != torch.get_num_threads()  # its own, not this process's
    loop.close()


def test_outputs_are_coalesced_per_request_and_cumulative(started):
    loop, collector = started
    hold(loop)
    collector.events.extend(loop.drain())
    loop.submit("a", CHAT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    hold(loop, steps=5)  # five steps (the prefill's token, four more) run without draining
    pending = [e for e in loop.drain() if isinstance(e, RequestOutput)]
    assert len(pending) == 1  # one per request, however many steps ran
    assert len(pending[0].token_ids) == 5 and len(pending[0].new_token_ids) == 1  # cumulative; the last step's
    collector.events.extend(pending)
    loop.release()
    collector.pump(loop, lambda: "a" in collector.finals())
    final = collector.finals()["a"]
    assert final.text.startswith(pending[0].text) and len(final.token_ids) == 30


def test_abort_frees_blocks_and_fork_shares_them(started):
    loop, collector = started
    hold(loop)
    loop.submit("a", CHAT, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    hold(loop, steps=2)  # "a" is prefilled and decoding: held, it cannot finish before the fork
    loop.fork("a", "b")
    hold(loop)
    assert loop.snapshot.stats["shared_blocks"] > 0
    loop.abort("a")
    loop.abort("b")
    loop.release()
    collector.pump(loop, lambda: {"a", "b"} <= set(collector.finals()))
    assert {o.finish_reason for o in collector.finals().values()} == {"abort"}
    collector.pump(loop, lambda: loop.snapshot.stats["used_blocks"] == 0)


def test_a_held_core_answers_commands_but_takes_no_step_until_released(started):
    loop, collector = started
    with pytest.raises(ValueError):
        loop.hold(-1)
    loop.hold()  # before the model has loaded: it holds once loaded
    collector.pump(loop, lambda: loop.held)
    steps = loop.snapshot.stats["steps"]
    loop.submit("a", CHAT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    loop.submit("long", "x" * 2000, SamplingParams(max_tokens=4))
    assert hold(loop) == steps  # a new hold: held once the commands before it are applied
    collector.events.extend(loop.drain())
    assert [type(e) for e in collector.events if getattr(e, "request_id", None)] == [Accepted, Rejected]
    assert [(v.request_id, v.status) for v in loop.snapshot.sequences] == [("a", "waiting")]

    assert hold(loop, steps=3) == steps + 3  # exactly three steps, then held again
    collector.events.extend(loop.drain())
    assert len(collector.latest("a").token_ids) == 3
    loop.fork("a", "b")
    assert hold(loop) == steps + 3
    assert {v.request_id for v in loop.snapshot.sequences} == {"a", "b"}
    assert loop.snapshot.stats["shared_blocks"] > 0  # the fork shares a's blocks at once
    loop.abort("a")
    assert hold(loop) == steps + 3
    assert [v.request_id for v in loop.snapshot.sequences] == ["b"]  # its blocks freed at once...
    collector.events.extend(loop.drain())
    assert "a" not in collector.finals()  # ...its finished output comes with the next step

    loop.release()
    assert not loop.held
    collector.pump(loop, lambda: {"a", "b"} <= set(collector.finals()))
    a, b = collector.finals()["a"], collector.finals()["b"]
    assert a.finish_reason == "abort" and len(a.token_ids) == 3
    assert b.finish_reason == "length" and len(b.token_ids) == 3 + 8  # max_tokens counts from the fork
    assert not any(isinstance(e, Held) for e in collector.events)  # the loop keeps Held to itself


def test_bad_requests_are_rejected_and_the_loop_lives_on(started):
    loop, collector = started
    loop.submit("long", [{"role": "user", "content": "x" * 2000}], SamplingParams(max_tokens=4))
    loop.submit("wide", [{"role": "user", "content": "x" * 700}], SamplingParams(max_tokens=4))
    loop.fork("nobody", "child")
    loop.submit("ok", CHAT, SamplingParams(temperature=0, max_tokens=4))
    collector.pump(loop, lambda: "ok" in collector.finals())
    rejected = {e.request_id: e.message for e in collector.events if isinstance(e, Rejected)}
    assert "context" in rejected["long"]  # longer than the model's context (1024)
    assert "blocks" in rejected["wide"]  # more than the whole pool (32 blocks of 16)
    assert "child" in rejected
    too_long = {e.request_id: e.too_long for e in collector.events if isinstance(e, Rejected)}
    assert too_long == {"long": True, "wide": True, "child": False}  # a chat may shorten the first two


@pytest.mark.parametrize("process", [False, True])
def test_a_model_that_fails_to_load_is_reported_and_requests_rejected(process):
    collector = Collector()
    loop = EngineLoop(functools.partial(load_llm, {"model": "/nowhere"}), wake=collector.wake, process=process)
    loop.start()
    loop.submit("a", CHAT, SamplingParams())
    collector.pump(loop, lambda: any(isinstance(e, Rejected) for e in collector.events))
    failed = [e for e in collector.events if isinstance(e, LoadFailed)]
    assert failed and "/nowhere" in failed[0].message
    assert "failed to load" in next(e for e in collector.events if isinstance(e, Rejected)).message
    loop.close()
    assert not loop.is_alive()


def test_a_subscribed_channel_sees_only_its_own_requests_and_the_main_channel_sees_all(started):
    loop, main = started
    mine = Collector()
    channel = loop.subscribe(mine.wake)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    loop.submit("text", "Once upon a time", SamplingParams(temperature=0.8, max_tokens=4, n=2),
                tag={"tenant": "alice"}, reply_to=channel)
    loop.submit("ids", [1, 2, 3, 4, 5], params, reply_to=channel)
    loop.submit("local", CHAT, params)
    mine.pump(channel, lambda: {"text", "text.1", "ids"} <= set(mine.finals()))
    main.pump(loop, lambda: {"text", "text.1", "ids", "local"} <= set(main.finals()))
    assert "local" not in {getattr(e, "request_id", None) for e in mine.events}
    assert not any(isinstance(e, (LoadProgress, Loaded)) for e in mine.events)
    accepted = {e.request_id: e.tag for e in main.events if isinstance(e, Accepted)}
    assert accepted == {"text": {"tenant": "alice"}, "ids": None, "local": None}
    assert mine.finals()["ids"].prompt_token_ids == (1, 2, 3, 4, 5)
    assert mine.finals()["text.1"].parent_id == "text"
    # Accepted comes before the request's outputs on every channel.
    kinds = [type(e) for e in mine.events if getattr(e, "request_id", "") == "ids"]
    assert kinds[0] is Accepted and set(kinds[1:]) == {RequestOutput}


def test_a_rejection_reaches_the_submitting_channel_as_a_bad_request(started):
    loop, _ = started
    mine = Collector()
    channel = loop.subscribe(mine.wake)
    loop.submit("long", "x" * 2000, SamplingParams(max_tokens=4, n=3), reply_to=channel)
    mine.pump(channel, lambda: any(isinstance(e, Rejected) for e in mine.events))
    rejected = next(e for e in mine.events if isinstance(e, Rejected))
    assert rejected.request_id == "long" and rejected.bad_request and "context" in rejected.message
    assert not loop._owners  # nothing kept for a request that never ran


def test_when_the_core_process_dies_its_requests_fail_and_later_ones_are_rejected(tiny_llama):
    loop, collector = start_loop(tiny_llama, process=True)
    mine = Collector()
    channel = loop.subscribe(mine.wake)
    loop.submit("a", CHAT, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), reply_to=channel)
    loop.submit("b", CHAT, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    hold(loop, steps=2)  # both are decoding, and held they cannot finish before the kill
    collector.pump(loop, lambda: {"a", "b"} <= {e.request_id for e in collector.events if isinstance(e, RequestOutput)})
    os.kill(loop._host._process.pid, signal.SIGKILL)
    collector.pump(loop, lambda: any(isinstance(e, EngineFailed) for e in collector.events))
    failed = next(e for e in collector.events if isinstance(e, EngineFailed))
    assert failed.request_ids == ("a", "b") and "exited" in failed.message
    mine.pump(channel, lambda: any(isinstance(e, EngineFailed) for e in mine.events))
    assert [e.request_ids for e in mine.events if isinstance(e, EngineFailed)] == [("a",)]
    assert not loop.ready and not loop.is_alive()
    loop.submit("c", CHAT, SamplingParams(max_tokens=4))
    collector.pump(loop, lambda: any(isinstance(e, Rejected) for e in collector.events))
    rejected = next(e for e in collector.events if isinstance(e, Rejected))
    assert rejected.request_id == "c" and not rejected.bad_request and "exited" in rejected.message
    loop.close()


def noisy_load(progress):
    """A loader that writes to stdout and stderr and logs, then fails (picklable: module level)."""
    print("core says hello on stdout", flush=True)
    print("core says hello on stderr", file=sys.stderr, flush=True)
    logging.getLogger("chatpager.test").warning("core logs a warning %d", 42)
    raise RuntimeError("no model here")


def test_a_core_process_logs_through_this_process_and_keeps_its_output_off_the_terminal(tmp_path, capfd, caplog):
    collector = Collector()
    output = tmp_path / "chatpager.log"
    loop = EngineLoop(noisy_load, wake=collector.wake, process=True, output_path=output)
    with caplog.at_level(logging.INFO, logger="chatpager"):
        loop.start()
        collector.pump(loop, lambda: any(isinstance(e, LoadFailed) for e in collector.events))
        loop.close()
    assert not loop.is_alive()
    [record] = [r for r in caplog.records if r.name == "chatpager.test"]
    assert record.getMessage() == "core logs a warning 42" and record.process != os.getpid()
    text = output.read_text()
    assert "hello on stdout" in text and "hello on stderr" in text and "core logs" not in text
    out, err = capfd.readouterr()
    assert "hello" not in out + err


def test_a_report_the_client_fails_to_handle_does_not_stop_the_next(tiny_llama, caplog):
    collector = Collector()
    calls = []

    def wake() -> None:  # fails once, as a buggy client callback would
        calls.append(None)
        if len(calls) == 1:
            raise RuntimeError("a client callback failed")
        collector.wake()

    loop = EngineLoop(functools.partial(load_llm, {"model": tiny_llama, "num_blocks": 8}), wake=wake, process=True)
    with caplog.at_level(logging.ERROR, logger="chatpager"):
        loop.start()
        loop.submit("a", CHAT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        collector.pump(loop, lambda: "a" in collector.finals())
        loop.close()
    assert "a client callback failed" in caplog.text


def test_a_stopped_core_can_be_restarted_and_serves_again(tiny_llama):
    loop, collector = start_loop(tiny_llama, process=True)
    collector.pump(loop, lambda: loop.ready)
    with pytest.raises(ChatpagerError, match="running"):
        loop.restart()
    os.kill(loop._host._process.pid, signal.SIGKILL)
    collector.pump(loop, lambda: any(isinstance(e, EngineFailed) for e in collector.events))
    loop.restart()
    loop.submit("b", CHAT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    collector.pump(loop, lambda: "b" in collector.finals())
    assert loop.ready and len(collector.finals()["b"].token_ids) == 4
    assert sum(isinstance(e, Loaded) for e in collector.events) == 2
    loop.close()
