"""The `chatpager` command: the chat TUI by default, `chatpager bench ...` for the benchmark,
`chatpager serve ...` for the OpenAI-compatible server.

Errors a user can act on (ChatpagerError, bad arguments) print one line, not a traceback.
"""
from __future__ import annotations

import sys

from chatpager.errors import ChatpagerError
from chatpager.omp_policy import choose_wait_policy


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    choose_wait_policy()  # before anything imports torch
    try:
        if argv[:1] == ["bench"]:
            from chatpager.bench.cli import main as bench_main

            return bench_main(argv[1:])
        if argv[:1] == ["serve"]:
            _check_model_arg(argv[1:])
            from chatpager.serve.cli import main as serve_main

            return serve_main(argv[1:])
        _check_model_arg(argv)  # fail before the UI starts, not inside it
        from chatpager.tui.main import main as tui_main

        return tui_main(argv)
    except (ChatpagerError, ValueError) as exc:
        print(f"chatpager: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _check_model_arg(argv: list[str]) -> None:
    import argparse

    from chatpager.engine.model.loader import check_model_source

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default=None)
    known, _ = parser.parse_known_args(argv)
    check_model_source(known.model)


if __name__ == "__main__":
    sys.exit(main())
