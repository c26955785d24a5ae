"""llama.cpp as a peer (llama-cpp-python, the optional `llamacpp` extra): the same GGUF file,
served the way a local llama.cpp / ollama user gets it — one session at a time, each turn one
completion over the whole history (llama.cpp reuses the KV of the longest prefix it still
holds from the previous call, so a session's own history is not recomputed).

Greedy (temperature 0), the same reply cap and EOS handling as chatpager; prompts are the same
token ids (the GGUF's vocabulary is the tokenizer's). TTFT is when the first token comes out.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from chatpager.bench.chatpager_runner import reply_text
from chatpager.bench.results import RunResult, TurnRecord
from chatpager.bench.workload import Message, Session, WorkloadSpec

Encode = Callable[[list[Message]], list[int]]
Progress = Callable[[int], None]
INSTALL = "pip install 'chatpager[llamacpp]' (builds llama-cpp-python==0.3.36 from source, ~10 min)"


def llama_cpp_missing(model: str | None) -> str | None:
    """Why llama.cpp cannot run here, or None when it can."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama.cpp skipped: llama-cpp-python is not installed ({INSTALL})"
    if model is not None and not str(model).lower().endswith(".gguf"):
        return "llama.cpp skipped: it runs .gguf files and --model is not one"
    return None


def gguf_path(model: str | None) -> Path:
    from chatpager.engine.model.loader import check_model_source

    return check_model_source(model)


class LlamaCppRunner:
    def __init__(self, model: str | None, tokenizer, encode: Encode, eos_token_ids: set[int],
                 spec: WorkloadSpec, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf_path(model)), n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.tokenizer = tokenizer
        self.encode = encode
        self.eos = set(eos_token_ids)
        self.spec = spec
        self.threads = threads

    def generate(self, prompt: list[int], max_tokens: int, ignore_eos: bool) -> tuple[list[int], float, float]:
        """(tokens, time of the first, time of the last) — perf_counter times."""
        out: list[int] = []
        first = None
        for tok in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if first is None:
                first = time.perf_counter()
            out.append(tok)
            if len(out) >= max_tokens or (not ignore_eos and tok in self.eos):
                break
        end = time.perf_counter()
        return out, first or end, end

    def run(self, sessions: list[Session], progress: Progress | None = None) -> RunResult:
        records: list[TurnRecord] = []
        start = time.perf_counter()
        for s in sessions:
            replies: list[str] = []
            for turn in range(self.spec.turns):
                prompt = self.encode(s.messages(turn, replies))
                submitted = time.perf_counter() - start
                out, first, end = self.generate(prompt, self.spec.max_tokens, self.spec.ignore_eos)
                records.append(TurnRecord(s.index, turn + 1, len(prompt), submitted, first - start, end - start,
                                          prompt_ids=prompt, output_ids=out))
                replies.append(reply_text(self.tokenizer, out))
                if progress:
                    progress(1)
        return RunResult("llama.cpp sequential", time.perf_counter() - start, records,
                         {"batch_size": 1, "threads": self.threads})
