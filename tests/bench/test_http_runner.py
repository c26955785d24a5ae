"""`chatpager bench --server URL`: the chat workload over HTTP, a quick smoke run."""
from __future__ import annotations

import json

from chatpager.bench.cli import main as bench_main
from chatpager.serve.config import ServeConfig
from tests.serve.support import serving


def test_bench_drives_the_workload_over_http_and_reports(tiny_model_factory, tmp_path, capsys):
    model = tiny_model_factory("llama", max_position_embeddings=8192)
    out = tmp_path / "http.json"
    with serving(model, ServeConfig(port=0), num_blocks=1024) as srv:
        code = bench_main(["--server", srv.base_url, "--sessions", "4", "--turns", "2",
                           "--max-tokens", "4", "--ignore-eos", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["errors"] == [] and report["turns_done"] == 8
    assert report["output_tokens"] == 8 * 4
    assert 0 < report["ttft_s_p50"] <= report["ttft_s_p99"]
    assert report["cached_token_share"] > 0  # second turns reuse their first turn's blocks
    assert all(t["cached_tokens"] > 0 for t in report["turns"] if t["turn"] == 2)
    printed = capsys.readouterr().out
    assert "TTFT p50 / p99 s" in printed and "cached-token share" in printed
