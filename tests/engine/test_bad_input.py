"""Bad input gets one clear error naming the problem, and the engine keeps serving."""
from __future__ import annotations

import shutil

import pytest

from chatpager import LLM, SamplingParams
from chatpager.errors import ModelLoadError, RequestError

PARAMS = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture
def llm(tiny_llama):
    return LLM(model=tiny_llama, block_size=4, num_blocks=16, max_model_len=48)


def test_empty_prompt(llm):
    with pytest.raises(RequestError, match="empty prompt"):
        llm.engine.add_request("", PARAMS)
    with pytest.raises(RequestError, match="empty prompt"):
        llm.engine.add_request([], PARAMS)


def test_prompt_over_max_model_len(llm):
    with pytest.raises(RequestError, match="context is 48"):
        llm.engine.add_request(list(range(48)), PARAMS)


def test_prompt_larger_than_the_pool(tiny_llama):
    llm = LLM(model=tiny_llama, block_size=4, num_blocks=4)
    with pytest.raises(RequestError, match="whole KV pool has 4"):
        llm.engine.add_request(list(range(20)), PARAMS)


def test_out_of_vocabulary_token(llm):
    with pytest.raises(RequestError, match="out of the vocabulary"):
        llm.engine.add_request([1, 2, 10**6], PARAMS)


def test_duplicate_request_id(llm):
    llm.engine.add_request([1, 2, 3], PARAMS, request_id="x")
    with pytest.raises(RequestError, match="already in use"):
        llm.engine.add_request([1, 2, 3], PARAMS, request_id="x")


def test_rejections_do_not_disturb_running_requests(llm):
    eng = llm.engine
    good = eng.add_request([5, 6, 7], PARAMS)
    eng.step()
    for bad in ([], list(range(60))):
        with pytest.raises(RequestError):
            eng.add_request(bad, PARAMS)
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert len(done[good].token_ids) == 5


def test_generation_stops_at_the_context_limit(llm):
    out = llm.generate([list(range(40))], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 8  # 40 + 8 = max_model_len


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_tokens=0), dict(n=0)])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


@pytest.mark.parametrize("bad", [dict(block_size=3), dict(block_size=256), dict(num_blocks=0),
                                 dict(preemption_mode="drop"), dict(attention="cuda-magic")])
def test_bad_engine_settings(bad, tiny_llama):
    with pytest.raises(ValueError):
        LLM(model=tiny_llama, **bad)


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="model not found"):
        LLM(model=str(tmp_path / "nope"))


def test_directory_without_weights(tmp_path, tiny_llama):
    shutil.copy(f"{tiny_llama}/config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LLM(model=str(tmp_path))


def test_unsupported_architecture(tmp_path, tiny_llama):
    shutil.copytree(tiny_llama, tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json").read_text().replace('"llama"', '"gpt2"')
    (tmp_path / "m" / "config.json").write_text(cfg)
    with pytest.raises(ModelLoadError):
        LLM(model=str(tmp_path / "m"))


def test_corrupt_weights(tmp_path, tiny_llama):
    shutil.copytree(tiny_llama, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="corrupt weights"):
        LLM(model=str(tmp_path / "m"))


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATPAGER_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        LLM(model=str(bad))



def test_cli_reports_a_bad_model_without_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "chatpager", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model not found" in proc.stderr
    assert "Traceback" not in proc.stderr
