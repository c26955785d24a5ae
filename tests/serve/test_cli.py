"""`chatpager serve` run the way a user runs it: a command whose engine has a process of its own,
answering the official client, and Ctrl+C ending both."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def interruptible() -> None:
    """SIGINT as a terminal's Ctrl+C finds it. A test run started in the background of a shell
    without job control inherits SIGINT ignored, and an ignored signal stays ignored through
    exec: serve would then never see the Ctrl+C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_the_serve_command_answers_and_ctrl_c_ends_it_and_its_engine(tiny_llama, tmp_path):
    port = free_port()
    env = os.environ | {"XDG_STATE_HOME": str(tmp_path)}  # its log file goes here
    server = subprocess.Popen([sys.executable, "-m", "chatpager", "serve", "--model", tiny_llama,
                               "--port", str(port), "--num-blocks", "64"],
                              stderr=subprocess.PIPE, text=True, env=env, preexec_fn=interruptible)
    try:
        lines = []
        while not lines or " on http://" not in lines[-1]:
            line = server.stderr.readline()
            assert line, "serve exited early:\n" + "".join(lines)
            lines.append(line)
        assert any("loading weights" in line for line in lines)  # the engine's process told its progress
        children = [int(p) for p in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
        spawned = [p for p in children if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(spawned) == 1, "the engine runs in a process of its own"

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=5,
                                               messages=[{"role": "user", "content": "hi"}],
                                               extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 5

        server.send_signal(signal.SIGINT)
        # uvicorn shuts down gracefully, then re-raises the signal: the exit status of an interrupt
        assert server.wait(timeout=30) == 130
        deadline = time.monotonic() + 10
        while any(running(p) for p in children):
            assert time.monotonic() < deadline, "a child of serve outlived it"
            time.sleep(0.1)
        assert list((tmp_path / "chatpager" / "log").glob("chatpager.log"))
    finally:
        if server.poll() is None:
            server.kill()
        server.stderr.close()


def test_a_model_that_fails_to_load_in_the_engine_process_ends_serve_with_one_line(tmp_path):
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')  # no architecture: fails in the engine's process
    save_file({"x": torch.zeros(2)}, str(model / "model.safetensors"))
    env = os.environ | {"XDG_STATE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "chatpager", "serve", "--model", str(model), "--port", str(free_port())],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("chatpager: error: the model failed to load:")
    assert "Traceback" not in done.stderr
