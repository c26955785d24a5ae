"""The TUI's parts that need no screen: prompts, the store, slash commands, export, the block map."""
from __future__ import annotations

import json

import pytest

from chatpager.engine.outputs import CacheSnapshot
from chatpager.tui import slash
from chatpager.tui.sessions import UserError
from chatpager.tui.main import parse_args
from chatpager.tui.export import export
from chatpager.tui.prompts import DEFAULT_PROMPT, load_prompts
from chatpager.tui.session import Message, Session
from chatpager.tui.store import Store
from chatpager.tui.swarm import load_turns
from chatpager.tui.widgets.block_map import (
    CACHED_STYLES,
    FREE_STYLE,
    SHARED_STYLES,
    USED_STYLE,
    block_rank,
    lru_ages,
)
from chatpager.tui.widgets.chat_message import printable


def test_shipped_prompts_share_a_long_preamble():
    prompts = load_prompts()
    assert len(prompts) >= 6 and DEFAULT_PROMPT in prompts
    assert not any(name.startswith("_") for name in prompts)
    preamble = prompts["assistant"].split("Role:")[0]
    sharing = [name for name, text in prompts.items() if text.startswith(preamble)]
    assert len(sharing) >= 4 and len(preamble.split()) > 250  # a few hundred tokens
    assert len(prompts["ticket-triage"].split()) > 500  # the long few-shot prompt
    assert "@include" not in "".join(prompts.values())


def test_swarm_turns_are_bundled():
    assert len(load_turns()) >= 20


def test_store_round_trips_sessions_in_creation_order(tmp_path):
    store = Store(tmp_path / "db" / "chat.sqlite3")
    first = Session("a", "First", "terse", "Be brief.", [Message("user", "hi")])
    second = Session("b", "Second", "custom", "Rhyme.")
    for session in (first, second):
        store.save_session(session)
        store.replace_messages(session)
    store.add_message("b", Message("user", "one"))
    store.add_message("b", Message("assistant", "two"))
    first.title = "Renamed"
    store.save_session(first)
    store.delete_session("missing")
    reopened = Store(tmp_path / "db" / "chat.sqlite3").load()
    assert [(s.id, s.title) for s in reopened] == [("a", "Renamed"), ("b", "Second")]
    assert [m.content for m in reopened[1].messages] == ["one", "two"]
    store.delete_session("a")
    assert [s.id for s in Store(tmp_path / "db" / "chat.sqlite3").load()] == ["b"]


def test_slash_commands_parse_and_complete():
    command, argument = slash.parse("/export json  out/chat.json ")
    assert command.name == "export" and argument == "json  out/chat.json"
    with pytest.raises(UserError, match="unknown command /nope"):
        slash.parse("/nope")
    assert [c.name for c in slash.matching("/s")] == ["system", "stop", "swarm"]
    assert slash.matching("/stop now") == []
    assert slash.suggest("/fo", []) == "rk "
    assert slash.suggest("/s", []) == ""  # ambiguous
    assert slash.suggest("/new tu", ["terse", "tutor"]) == "tor"
    assert slash.suggest("/regen 2", ["terse"]) == ""


def test_export_markdown_and_json(tmp_path):
    session = Session("a", "My chat!", "terse", "Be brief.",
                      [Message("user", "hi"), Message("assistant", "**hello**")])
    markdown = export(session, "md", tmp_path / "chat.md").read_text()
    assert markdown.startswith("# My chat!") and "## assistant\n\n**hello**" in markdown
    record = json.loads(export(session, "json", tmp_path / "chat.json").read_text())
    assert record["system"] == "Be brief." and record["messages"][1]["content"] == "**hello**"
    with pytest.raises(ValueError, match="unknown export format"):
        export(session, "pdf", tmp_path / "chat.pdf")


def test_printable_replaces_control_and_format_characters():
    assert printable("a\x1b[31mb\tc\nd\u202ee\u200bf") == "a\ufffd[31mb\tc\nd\ufffde\ufffdf"


def test_block_states_and_lru_shades():
    snapshot = CacheSnapshot(
        step=1, block_size=16,
        refcounts=(0, 0, 0, 1, 2, 5),
        hashed=(False, True, True, True, True, True),
        free_order=(0, 1, 2),  # 1 is evicted before 2
        sequences=(), stats={},
    )
    ages = lru_ages(snapshot)
    assert ages == {1: 0.0, 2: 1.0}
    styles = [block_rank(snapshot, block, ages)[1] for block in range(6)]
    assert styles == [FREE_STYLE, CACHED_STYLES[0], CACHED_STYLES[-1], USED_STYLE,
                      SHARED_STYLES[0], SHARED_STYLES[-1]]


def test_command_line_options_become_the_app_config(tmp_path):
    config = parse_args(["--num-blocks", "256", "--block-size", "32", "--swarm", "4",
                         "--data-dir", str(tmp_path), "--attention", "torch", "--dtype", "bfloat16"])
    engine = config.engine
    assert (engine.num_blocks, engine.block_size, config.swarm) == (256, 32, 4)
    assert config.database == tmp_path / "chatpager.sqlite3"
    assert (engine.attention, engine.dtype, engine.device, engine.model) == ("torch", "bfloat16",
                                                                             "auto", None)
    for bad in (["--num-blocks", "0"], ["--kv-cache-memory", "-1"], ["--preemption-mode", "x"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    options = parse_args(["--kv-cache-memory", "64", "--no-prefix-caching", "--preemption-mode", "swap",
                          "--max-model-len", "512"]).engine.llm_kwargs()
    assert options["kv_cache_memory"] == 64 * 2**20 and options["enable_prefix_caching"] is False
    assert (options["preemption_mode"], options["max_model_len"]) == ("swap", 512)
