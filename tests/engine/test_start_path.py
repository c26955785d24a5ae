"""What start-up imports: loading a model and chatting must not import transformers (seconds
of imports, issue 9's warm-start goal), nor torch's compiler stack or Triton on CPU. Checked in
a fresh process, since this test session has imported all of them already."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["transformers", "torch._dynamo", "torch._inductor", "triton", "fastapi", "textual"]
CHILD = """
import json, sys
from chatpager import LLM, SamplingParams
llm = LLM(sys.argv[1], quantization="none")
out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0.0, max_tokens=2))
print(json.dumps({"tokens": len(out[0].token_ids), "loaded": [m for m in sys.argv[2:] if m in sys.modules]}))
"""


@pytest.mark.parametrize("arch", ["llama", "llama3-rope"])
def test_loading_and_chatting_import_no_transformers(tiny_model_factory, arch):
    proc = subprocess.run([sys.executable, "-c", CHILD, tiny_model_factory(arch), *HEAVY], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 2
    assert result["loaded"] == []


def test_the_command_line_parses_without_torch():
    code = "import sys, chatpager.cli, chatpager.tui.main; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_loading_leaves_the_thread_count_as_it_was(tiny_llama):
    """The model is built on one thread (small memory-bound ops); inference gets them all back."""
    import torch

    from chatpager import LLM

    threads = torch.get_num_threads()
    assert threads > 1  # conftest sets 2, so the build's one-thread phase is visible
    LLM(tiny_llama)
    assert torch.get_num_threads() == threads
