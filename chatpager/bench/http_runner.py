"""`chatpager bench --server URL`: the multi-tenant chat workload over HTTP.

The same seeded sessions as the in-process benchmark (`chatpager.bench.workload`), each a
client thread of its own: it streams one turn at a time from `/v1/chat/completions`
(greedy, `stream_options.include_usage`), appends the reply it received to its history, and
sends the next turn. All sessions run concurrently, so the server sees what a host of many
tenants sees. Measured per turn on the client: time to first content and to the end; the
server's usage gives prompt, completion and cached tokens.

Only the standard library talks HTTP here: the benchmark runs wherever chatpager installs.
"""
from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from chatpager.bench.workload import build_workload, Session, WorkloadSpec

TIMEOUT_S = 600


@dataclass(slots=True)
class HttpTurn:
    session: int
    turn: int  # 1-based
    submitted: float  # seconds since the run started
    first_token: float = 0.0
    finished: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class ServerError(RuntimeError):
    pass


def _post_stream(url: str, body: dict, api_key: str | None):
    """Yield each SSE payload (parsed JSON) of a streamed POST."""
    parts = urlsplit(url)
    conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_class(parts.hostname, parts.port, timeout=TIMEOUT_S)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn.request("POST", parts.path, json.dumps(body), headers)
        response = conn.getresponse()
        if response.status != 200:
            raise ServerError(f"HTTP {response.status}: {response.read().decode(errors='replace')}")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return
            payload = json.loads(line[6:])
            if "error" in payload:
                raise ServerError(payload["error"]["message"])
            yield payload
    finally:
        conn.close()


def _run_session(endpoint: str, model: str, session: Session, spec: WorkloadSpec, start: float,
                 api_key: str | None, out: list[HttpTurn], errors: list[str]) -> None:
    replies: list[str] = []
    try:
        for k in range(spec.turns):
            body = {"model": model, "messages": session.messages(k, replies), "stream": True,
                    "stream_options": {"include_usage": True}, "temperature": 0,
                    "max_tokens": spec.max_tokens, "ignore_eos": spec.ignore_eos}
            turn = HttpTurn(session.index, k + 1, time.perf_counter() - start)
            text = []
            for chunk in _post_stream(endpoint, body, api_key):
                for choice in chunk.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    if content and not turn.first_token:
                        turn.first_token = time.perf_counter() - start
                    text.append(content or "")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    turn.prompt_tokens = usage["prompt_tokens"]
                    turn.completion_tokens = usage["completion_tokens"]
                    turn.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
            turn.finished = time.perf_counter() - start
            turn.first_token = turn.first_token or turn.finished  # an empty reply
            replies.append("".join(text))
            out.append(turn)
    except (OSError, ServerError) as exc:
        errors.append(f"session {session.index}: {exc}")


def _model_name(base_url: str, api_key: str | None) -> str:
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        conn.request("GET", parts.path.rstrip("/") + "/models", headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise ServerError(f"GET /v1/models: HTTP {response.status}")
        return json.loads(response.read())["data"][0]["id"]
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run_http_bench(base_url: str, spec: WorkloadSpec, api_key: str | None = None) -> dict:
    """Drive the workload against `base_url` (…/v1); the report as a JSON-able dict."""
    base_url = base_url.rstrip("/")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    model = _model_name(base_url, api_key)
    sessions = build_workload(spec)
    turns: list[HttpTurn] = []
    errors: list[str] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=_run_session, daemon=True,
                                args=(base_url + "/chat/completions", model, s, spec, start, api_key,
                                      turns, errors)) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return summarize(base_url, model, spec, turns, errors, wall)


def summarize(base_url: str, model: str, spec: WorkloadSpec, turns: list[HttpTurn],
              errors: list[str], wall: float) -> dict:
    ttft = [t.first_token - t.submitted for t in turns]
    later = [t for t in turns if t.turn > 1]
    prompt = sum(t.prompt_tokens for t in turns)
    output = sum(t.completion_tokens for t in turns)
    return {
        "server": base_url, "model": model, "workload": {**asdict(spec), "prompts_dir": str(spec.prompts_dir)},
        "sessions": spec.sessions, "turns_done": len(turns), "errors": errors,
        "wall_s": wall, "output_tokens": output, "output_tokens_per_s": output / wall if wall else 0.0,
        "ttft_s_p50": percentile(ttft, 0.5), "ttft_s_p99": percentile(ttft, 0.99),
        "ttft_s_first_turn_mean": statistics.fmean([t.first_token - t.submitted for t in turns
                                                    if t.turn == 1]) if turns else 0.0,
        "ttft_s_later_turns_mean": statistics.fmean([t.first_token - t.submitted for t in later])
        if later else 0.0,
        "latency_s_mean": statistics.fmean([t.finished - t.submitted for t in turns]) if turns else 0.0,
        "prompt_tokens": prompt, "cached_tokens": sum(t.cached_tokens for t in turns),
        "cached_token_share": sum(t.cached_tokens for t in turns) / prompt if prompt else 0.0,
        "turns": [asdict(t) for t in sorted(turns, key=lambda t: (t.session, t.turn))],
    }


def print_http_report(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"chatpager serve over HTTP: {report['model']} at {report['server']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("sessions × turns done", f"{report['sessions']} × {report['turns_done'] // max(report['sessions'], 1)}"),
        ("wall s", f"{report['wall_s']:.1f}"),
        ("output tokens", f"{report['output_tokens']}"),
        ("output tokens/s", f"{report['output_tokens_per_s']:.1f}"),
        ("TTFT p50 / p99 s", f"{report['ttft_s_p50']:.3f} / {report['ttft_s_p99']:.3f}"),
        ("TTFT mean, turn 1 / later s",
         f"{report['ttft_s_first_turn_mean']:.3f} / {report['ttft_s_later_turns_mean']:.3f}"),
        ("latency mean s", f"{report['latency_s_mean']:.2f}"),
        ("cached-token share", f"{100 * report['cached_token_share']:.1f}%"),
        ("errors", f"{len(report['errors'])}"),
    ]
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    for error in report["errors"][:5]:
        console.print(f"[red]{error}[/red]", markup=True)
