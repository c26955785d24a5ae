"""The TUI's parts that need no screen: prompts, the store, slash commands, export, the block map."""
from __future__ import annotations

import json

import pytest

from chatpager.engine.outputs import CacheSnapshot
from chatpager.prompts import DEFAULT_PROMPT, load_prompts
from chatpager.tui import commands
from chatpager.tui.export import export
from chatpager.tui.main import parse_args
from chatpager.tui.session import Message, Session
from chatpager.tui.sessions import UserError
from chatpager.tui.store import Store
from chatpager.tui.swarm import load_turns
from chatpager.tui.widgets.block_map import block_rank, CACHED_STYLES, FREE_STYLE, lru_ages, SHARED_STYLES, USED_STYLE
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
    command, argument = commands.parse("/export json  out/chat.json ")
    assert command.name == "export" and argument == "json  out/chat.json"
    with pytest.raises(UserError, match="unknown command /nope"):
        commands.parse("/nope")
    assert [c.name for c in commands.matching("/s")] == ["system", "stop", "set", "search", "swarm"]
    assert commands.matching("/stop now") == []
    assert commands.suggest("/fo", []) == "rk "
    assert commands.suggest("/s", []) == ""  # ambiguous
    assert commands.suggest("/new tu", ["terse", "tutor"]) == "tor"
    assert commands.suggest("/regen 2", ["terse"]) == ""


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


def test_a_streaming_reply_is_checkpointed_and_marked_interrupted_after_a_crash(tmp_path):
    path = tmp_path / "chat.sqlite3"
    store = Store(path)
    session = Session("a", "Chat", "terse", "Be brief.", [Message("user", "hi")])
    store.save_session(session)
    store.replace_messages(session)
    store.checkpoint({"a": "Hel"})
    store.checkpoint({"a": "Hello, wor"})  # the same row, updated
    # the process dies here: another one opens the file
    crashed = Store(path).load()[0]
    assert [(m.role, m.content, m.interrupted) for m in crashed.messages] == [
        ("user", "hi", False), ("assistant", "Hello, wor", True)]
    # a reply that ends is completed in the row it was checkpointed in
    store.add_message("a", Message("assistant", "Hello, world"))
    store.checkpoint({"a": "dropped"})
    store.discard_checkpoint("a")
    ended = Store(path).load()[0]
    assert [(m.content, m.interrupted) for m in ended.messages] == [("hi", False), ("Hello, world", False)]


def _old_database(path) -> None:
    """What chatpager 0.1 wrote: no schema version, no settings, no message status."""
    import sqlite3

    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE sessions (id TEXT PRIMARY KEY, title TEXT NOT NULL, prompt_name TEXT NOT NULL,
                               system TEXT NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL
                               REFERENCES sessions(id) ON DELETE CASCADE, role TEXT NOT NULL,
                               content TEXT NOT NULL);
        INSERT INTO sessions VALUES ('a', 'Old chat', 'terse', 'Be brief.');
        INSERT INTO messages (session_id, role, content) VALUES ('a', 'user', 'hi');
        INSERT INTO messages (session_id, role, content) VALUES ('gone', 'user', 'an orphan');
        INSERT INTO messages (session_id, role, content) VALUES ('a', 'assistant', 'hello');
    """)
    db.commit()
    db.close()


def test_an_older_database_is_migrated_and_orphans_are_skipped(tmp_path):
    import sqlite3

    from chatpager.tui.store import SCHEMA_VERSION

    path = tmp_path / "old.sqlite3"
    _old_database(path)
    store = Store(path)
    [session] = store.load()
    assert (session.title, [m.content for m in session.messages]) == ("Old chat", ["hi", "hello"])
    session.settings = {"temperature": 0.2}
    store.save_session(session)
    store.close()
    assert Store(path).load()[0].settings == {"temperature": 0.2}
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_newer_or_foreign_database_is_refused_with_a_clear_message(tmp_path):
    import sqlite3

    from chatpager.tui.store import StoreError

    newer = tmp_path / "newer.sqlite3"
    Store(newer).close()
    db = sqlite3.connect(newer)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match="newer chatpager .*schema version 99"):
        Store(newer)
    foreign = tmp_path / "notes.sqlite3"
    foreign.write_text("not a database, just notes\n" * 100)
    with pytest.raises(StoreError, match="not a chatpager database"):
        Store(foreign)


def test_the_command_line_reports_a_database_it_cannot_use(tmp_path, capsys):
    import sqlite3

    from chatpager.cli import main

    Store(tmp_path / "chatpager.sqlite3").close()
    db = sqlite3.connect(tmp_path / "chatpager.sqlite3")
    db.execute("PRAGMA user_version = 7")
    db.close()
    assert main(["--data-dir", str(tmp_path)]) == 2
    assert "written by a newer chatpager" in capsys.readouterr().err


def test_a_user_turn_left_without_a_reply_is_merged_with_the_next():
    session = Session("a", "Chat", "terse", "Be brief.", [
        Message("user", "first"), Message("assistant", "ok"),
        Message("user", "lost in a crash"), Message("user", "again"),
    ])
    assert session.chat() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "lost in a crash\n\nagain"},
    ]


def test_sampling_and_prompt_options(tmp_path, capsys):
    (tmp_path / "mine.md").write_text("You answer in haiku.")
    config = parse_args(["--temperature", "0", "--top-p", "0.5", "--max-tokens", "32",
                         "--prompts-dir", str(tmp_path)])
    assert (config.params.temperature, config.params.top_p, config.params.max_tokens) == (0, 0.5, 32)
    assert config.prompts_dir == tmp_path and load_prompts(config.prompts_dir) == {
        "mine": "You answer in haiku."}
    for bad in (["--temperature", "-1"], ["--top-p", "0"], ["--max-tokens", "0"],
                ["--prompts-dir", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit) as exit:
            parse_args(bad)
        assert exit.value.code == 2
    with pytest.raises(SystemExit) as exit:
        parse_args(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("chatpager ")


def test_export_picks_a_new_name_and_refuses_to_overwrite(tmp_path, monkeypatch):
    from chatpager.tui.export import default_path

    monkeypatch.chdir(tmp_path)
    session = Session("a", "My chat!", "terse", "Be brief.", [Message("user", "hi")])
    assert export(session) == tmp_path / "my-chat.md"
    assert default_path(session, "md") == tmp_path / "my-chat-2.md"
    with pytest.raises(FileExistsError):
        export(session, "md", tmp_path / "my-chat.md")
    (tmp_path / "my-chat.md").write_text("old")
    export(session, "md", tmp_path / "my-chat.md", overwrite=True)
    assert (tmp_path / "my-chat.md").read_text().startswith("# My chat!")


def test_demo_starts_on_a_small_pool_unless_one_is_given():
    from chatpager.tui.config import DEMO_NUM_BLOCKS

    config = parse_args(["--demo"])
    assert config.demo and config.engine.num_blocks == DEMO_NUM_BLOCKS
    assert parse_args(["--demo", "--num-blocks", "500"]).engine.num_blocks == 500
    assert parse_args(["--demo", "--kv-cache-memory", "64"]).engine.num_blocks is None
    assert not parse_args([]).demo and parse_args([]).engine.num_blocks is None


def test_stats_panel_names_a_quantized_kv_cache_and_speculation():
    from chatpager.tui.widgets.cache_stats import runtime_label, speculation_label

    info = {"device": "cpu", "dtype": "float32", "attention": "torch", "quantization": "int4",
            "kv_cache_dtype": "float32", "kv_bytes_per_block": 737280}
    assert runtime_label(info) == "cpu · float32 · int4 · torch"  # a float32 cache says nothing more
    info |= {"kv_cache_dtype": "int8", "kv_bytes_per_block": 207360}
    assert runtime_label(info) == "cpu · float32 · int4 · kv int8 (202 KiB/block) · torch"
    assert runtime_label(info | {"attention": "cpu"}).endswith(" · C kernel")  # the backend's name says "cpu" twice
    assert speculation_label({"spec_proposed_tokens": 0}) == ""
    spec = {"spec_proposed_tokens": 40, "spec_acceptance_rate": 0.5, "spec_tokens_per_step": 2.25}
    assert speculation_label(spec) == " · spec 50.0 % accepted, 2.2 tok/step"
