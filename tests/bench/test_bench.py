"""`chatpager bench`: the workload, the allocation model, the agreement check, and one tiny
end-to-end run whose JSON report is checked for structure and sanity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatpager.bench.cli import main as bench_main
from chatpager.bench.contiguous import allocation_model
from chatpager.bench.results import greedy_agreement, RunResult, TurnRecord
from chatpager.bench.workload import build_workload, WorkloadSpec


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory) -> Path:
    """Three prompts, two of which include the same preamble (as prompts/ does)."""
    d = tmp_path_factory.mktemp("prompts")
    (d / "_preamble.md").write_text("You help a small team. Lead with the answer, then explain briefly.\n")
    (d / "helper.md").write_text("@include _preamble.md\nRole: general helper.\n")
    (d / "reviewer.md").write_text("@include _preamble.md\nRole: code reviewer.\n")
    (d / "pirate.md").write_text("Answer like a pirate.\n")
    return d


def test_workload_is_seeded_and_uses_every_prompt_first(prompts_dir):
    spec = WorkloadSpec(sessions=5, turns=3, prompts_dir=prompts_dir, seed=7)
    sessions = build_workload(spec)
    assert sessions == build_workload(spec)  # same seed, same workload
    assert sessions != build_workload(WorkloadSpec(sessions=5, turns=3, prompts_dir=prompts_dir, seed=8))
    assert [s.prompt_name for s in sessions[:3]] == ["helper", "pirate", "reviewer"]
    assert all(len(s.user_messages) == 3 for s in sessions)
    assert sessions[0].system_prompt.startswith("You help a small team.")  # the include is expanded


def test_a_turn_sends_the_whole_history():
    spec = WorkloadSpec(sessions=1, turns=3)
    session = build_workload(spec)[0]
    msgs = session.messages(2, ["first reply", "second reply"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == "first reply" and msgs[-1]["content"] == session.user_messages[2]


def _turn(session: int, turn: int, prompt: list[int], output: list[int]) -> TurnRecord:
    return TurnRecord(session, turn, len(prompt), 0.0, prompt_ids=prompt, output_ids=output)


def test_allocation_model_counts_shared_prefix_blocks_once():
    shared = list(range(64))  # four full blocks of 16 both sessions start with
    turns = [_turn(0, 1, shared + [100] * 20, [1] * 8), _turn(1, 1, shared + [200] * 30, [2] * 8)]
    m = allocation_model(turns, block_size=16, num_blocks=100, max_model_len=512, max_tokens=8,
                         kv_bytes_per_token=10)
    per = m["slots_per_session"]
    assert per["contiguous_max_model_len"] == 512
    assert per["contiguous_prompt_plus_max_tokens"] == (84 + 8 + 94 + 8) / 2
    assert per["paged_no_sharing"] == 16 * (6 + 7) / 2  # 92 and 102 tokens -> 6 and 7 blocks
    # 4 shared full blocks once, then 1 and 2 own full blocks, and one partial block each
    assert per["paged"] == 16 * (4 + 1 + 2 + 2) / 2
    assert m["sessions_that_fit"]["contiguous_max_model_len"] == 1600 // 512
    assert m["fit_ratio_paged_vs_max_model_len"] == m["sessions_that_fit"]["paged"] / 3
    assert m["bytes_all_sessions_at_peak"]["paged"] < m["bytes_all_sessions_at_peak"]["paged_no_sharing"]


def test_greedy_agreement_compares_only_turns_with_the_same_prompt():
    ours = RunResult("a", 1.0, [_turn(0, 1, [1, 2], [5, 6]), _turn(0, 2, [1, 2, 5, 6, 3], [7]),
                                _turn(1, 1, [4], [9, 9])])
    theirs = RunResult("b", 1.0, [_turn(0, 1, [1, 2], [5, 6]), _turn(0, 2, [1, 2, 5, 6, 3], [8]),
                                  _turn(1, 1, [4, 4], [9, 9])])
    assert greedy_agreement(ours, theirs) == {"compared": 2, "identical": 1, "skipped": 1,
                                              "first_divergence_tokens": [0]}


@pytest.fixture(scope="module")
def quick_report(tiny_llama, prompts_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--model", tiny_llama, "--prompts", str(prompts_dir), "--kv-cache-mib", "4",
            "--json", str(out / "report.json"), "--plot", str(out / "report.png")]
    assert bench_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    report["_plot"] = out / "report.png"
    return report


def test_quick_run_reports_every_runner(quick_report):
    r = quick_report
    for key in ("meta", "workload", "chatpager", "transformers_serial", "transformers_static", "speedup",
                "greedy_agreement", "contiguous", "goals", "trace", "turns"):
        assert key in r
    assert r["meta"]["command"].startswith("chatpager bench --quick")
    cp = r["chatpager"]
    assert cp["turns"] == 4 * 2 and cp["output_tokens"] > 0 and cp["output_tokens_per_s"] > 0
    assert set(cp["ttft_s_by_turn"]) == {"1", "2"}
    assert r["transformers_serial"]["batch_size"] == 1 and r["transformers_static"]["batch_size"] == 2
    assert r["speedup"]["transformers_serial"] > 0
    assert {g["goal"] for g in r["goals"]} >= {"KV utilization, mean over steps", "TTFT turn 2 / turn 1"}


def test_quick_run_figures_are_sane(quick_report):
    cp = quick_report["chatpager"]
    second_turns = [t for t in quick_report["turns"]["chatpager"] if t["turn"] == 2]
    assert all(t["cached_tokens"] > 0 for t in second_turns)  # the history came from the prefix cache
    assert cp["prefix_hit_rate_later_turns"] > 0
    assert 0 < cp["kv_utilization_mean"] <= 1 and 0 < cp["kv_utilization_min"] <= 1
    assert cp["sharing_ratio_peak"] > 1  # the sessions' system prompts share a preamble
    assert 0 < cp["prefill_computed_over_prompt_sent"] < 1
    assert 0 < cp["peak_blocks"] <= cp["num_blocks"]
    assert cp["preemptions"] == 0
    trace = quick_report["trace"]
    assert len(trace["t"]) == len(trace["kv_utilization"]) == cp["steps"] > 0
    c = quick_report["contiguous"]
    held = c["bytes_all_sessions_at_peak"]
    assert held["contiguous_max_model_len"] >= held["contiguous_prompt_plus_max_tokens"] >= held["paged"]
    assert c["sessions_that_fit"]["paged"] >= c["sessions_that_fit"]["contiguous_max_model_len"]


def test_quick_run_greedy_replies_match_transformers_one_at_a_time(quick_report):
    serial = quick_report["greedy_agreement"]["transformers_serial"]
    assert serial["compared"] > 0 and serial["identical"] == serial["compared"]


def test_quick_run_writes_a_plot(quick_report):
    pytest.importorskip("matplotlib")
    assert quick_report["_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_workload_sizes_are_rejected(capsys):
    with pytest.raises(ValueError, match="sessions must be >= 1"):
        bench_main(["--sessions", "0"])


def test_single_chat_compares_runners_on_one_reply(tiny_llama, prompts_dir, tmp_path, capsys):
    out = tmp_path / "single.json"
    argv = ["--single", "--single-tokens", "6", "--model", tiny_llama, "--prompts", str(prompts_dir),
            "--kv-cache-mib", "4", "--json", str(out)]
    assert bench_main(argv) == 0
    report = json.loads(out.read_text())
    runs = {r["runner"]: r for r in report["runs"]}
    assert set(runs) == {"chatpager", "transformers generate"}  # llama.cpp runs .gguf files only
    assert "llama.cpp skipped" in capsys.readouterr().out
    for r in runs.values():
        assert r["tokens"] == 6 and r["ttft_s"] > 0 and r["tokens_per_s"] > 0
    # the tiny model runs unquantized, so greedy tokens are transformers' own
    assert runs["transformers generate"]["same_tokens_as_chatpager"] == 6
