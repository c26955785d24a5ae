"""Multi-LoRA: adapters in PEFT's format give peft's own greedy tokens, mixed in one batch; the
prefix cache keeps adapters apart; quantized base weights take the delta on top; bad adapters
and unknown names are clear errors; block-manager invariants hold with adapters mixed in."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from chatpager import LLM, SamplingParams
from chatpager.engine.core.block_keys import root_key
from chatpager.engine.core.request import Sequence
from chatpager.engine.model.loader import load_model_config
from chatpager.engine.model.lora import LoraAdapter, LoraError, module_shapes
from chatpager.engine.model.lora_layers import LoraWeights
from chatpager.engine.model.quantization import int8_linear, quantize_int4
from chatpager.errors import RequestError
from tests.oracles import hf_greedy
from tests.engine.core.test_block_pool_properties import BLOCK_SIZE, PoolMachine

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# a: every projection at rank 4; b: a few at rank 8 with rsLoRA scaling (padding, missing modules)
ADAPTERS = {"a": dict(r=4, lora_alpha=8, target_modules=ALL, seed=1),
            "b": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                      seed=2)}
PROMPT = [(7 * i + 3) % 200 + 20 for i in range(21)]  # 21 tokens: several full blocks of 4
OTHER = PROMPT + [33, 44, 55]  # the first prompt continued: shares its blocks under one adapter
NEW_TOKENS = 12


def make_adapter(base_dir: str, out: Path, r: int, lora_alpha: int, target_modules: list[str], seed: int,
                 use_rslora: bool = False) -> str:
    """A random PEFT LoRA adapter for the model at `base_dir` (lora_B non-zero, unlike peft's init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                                            use_rslora=use_rslora, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapter_factory(tmp_path_factory):
    """make(model_dir) -> the adapters of ADAPTERS for that model, made once."""
    made: dict[str, dict[str, str]] = {}

    def make(model_dir: str) -> dict[str, str]:
        if model_dir not in made:
            root = tmp_path_factory.mktemp("loras")
            made[model_dir] = {name: make_adapter(model_dir, root / name, **spec) for name, spec in ADAPTERS.items()}
        return made[model_dir]

    return make


@pytest.fixture(scope="module")
def adapters(tiny_llama, adapter_factory) -> dict[str, str]:
    return adapter_factory(tiny_llama)


def peft_reference(model_dir: str, adapters: dict[str, str], base=None):
    """One PeftModel holding every adapter (set_adapter / disable_adapter pick), on `base` or
    the checkpoint's own weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = base or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def peft_greedy(model, prompt: list[int], lora: str | None) -> list[int]:
    if lora is None:
        with model.disable_adapter():
            return hf_greedy(model, prompt, NEW_TOKENS, ignore_eos=True)
    model.set_adapter(lora)
    return hf_greedy(model, prompt, NEW_TOKENS, ignore_eos=True)


def run_mixed(llm: LLM, requests: list[tuple[list[int], str | None]]) -> list[list[int]]:
    """Submit every request, check they all run in the first step together, run to the end."""
    params = [SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, lora=lora)
              for _, lora in requests]
    ids = [llm.engine.add_request(prompt, p) for (prompt, _), p in zip(requests, params)]
    final = {}
    for out in llm.engine.step():
        final[out.request_id] = out
    assert len(llm.engine.scheduler.running) == len(requests)  # one batch, adapters mixed
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            final[out.request_id] = out
    return [list(final[i].token_ids) for i in ids]


def lora_llm(model: str, adapters: dict[str, str], **kwargs) -> LLM:
    return LLM(model, lora_adapters=adapters, device="cpu", dtype="float32", block_size=BLOCK_SIZE,
               num_blocks=64, **kwargs)


MIXED = [(PROMPT, "a"), (PROMPT, "b"), (PROMPT, None), (OTHER, "a")]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # plain; qkv bias; q/k norm after q/k_proj
def test_a_mixed_batch_gives_peft_greedy_tokens_per_adapter(arch, tiny_model_factory, adapter_factory):
    model = tiny_model_factory(arch)
    adapters = adapter_factory(model)
    llm = lora_llm(model, adapters, quantization="none")
    got = run_mixed(llm, MIXED)
    reference = peft_reference(model, adapters)
    expected = [peft_greedy(reference, prompt, lora) for prompt, lora in MIXED]
    assert got == expected
    assert len({tuple(t) for t in got[:3]}) == 3  # the adapters really change the output
    assert llm.model_info["lora_adapters"] == ["a", "b"]


def test_speculative_verification_rows_take_their_adapter(tiny_llama, adapter_factory):
    """Prompt-lookup proposals put several rows of one sequence in a decode step; greedy output
    stays peft's. The prompts repeat themselves so proposals are made."""
    adapters = adapter_factory(tiny_llama)
    llm = lora_llm(tiny_llama, adapters, quantization="none", speculative="ngram", num_speculative_tokens=3)
    loop = PROMPT[:6] * 4
    requests = [(loop, "a"), (loop, "b"), (loop, None)]
    got = run_mixed(llm, requests)
    reference = peft_reference(tiny_llama, adapters)
    assert got == [peft_greedy(reference, prompt, lora) for prompt, lora in requests]
    assert llm.stats()["spec_proposed_tokens"] > 0


def test_prefix_cache_is_shared_under_one_adapter_only(tiny_llama, adapters):
    llm = lora_llm(tiny_llama, adapters, quantization="none")
    greedy = dict(temperature=0, max_tokens=2)
    first = llm.generate(PROMPT, SamplingParams(**greedy, lora="a"))[0]
    other = llm.generate(PROMPT, SamplingParams(**greedy, lora="b"))[0]
    base = llm.generate(PROMPT, SamplingParams(**greedy))[0]
    again = llm.generate(PROMPT, SamplingParams(**greedy, lora="a"))[0]
    assert first.num_cached_tokens == 0
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0  # same tokens, other adapter
    assert again.num_cached_tokens >= len(PROMPT) - BLOCK_SIZE  # same adapter: its blocks are hits
    assert again.token_ids == first.token_ids


@pytest.mark.parametrize("loras", [[None, "b", "a", None, "b"], [None, "b", None], ["a", "a"], ["c", None, "a"]])
def test_batched_delta_is_each_rows_own_adapter(tiny_llama, loras):
    """Groups of unequal size (padding), rows without an adapter, one adapter of three, two
    that are not neighbouring slots (the stacks gathered, not sliced)."""
    config = load_model_config(Path(tiny_llama))
    shapes = module_shapes(config)
    gen = torch.Generator().manual_seed(0)
    made = [LoraAdapter(name, "", rank, {(0, m): (torch.randn(rank, shapes[m][0], generator=gen),
                                                  torch.randn(shapes[m][1], rank, generator=gen))
                                         for m in modules})
            for name, rank, modules in (("a", 2, ["q_proj", "v_proj"]), ("b", 3, ["k_proj", "v_proj"]),
                                        ("c", 1, ["q_proj", "k_proj", "v_proj"]))]
    weights = LoraWeights(made, config, torch.float32, torch.device("cpu"))
    counts = [2, 3, 1, 2, 1][:len(loras)]
    x = torch.randn(sum(counts), config.hidden_size, generator=gen)
    y = torch.randn(sum(counts), sum(shapes[m][1] for m in ("q_proj", "k_proj", "v_proj")), generator=gen)
    got = weights.batch(loras, counts, torch.device("cpu")).add(0, "qkv", x, y.clone())
    row_lora = [lora for lora, n in zip(loras, counts) for _ in range(n)]
    for row, lora in enumerate(row_lora):
        adapter = {a.name: a for a in made}.get(lora)
        parts = []
        for m in ("q_proj", "k_proj", "v_proj"):
            pair = adapter.weights.get((0, m)) if adapter else None
            parts.append(x[row] @ pair[0].T @ pair[1].T if pair else torch.zeros(shapes[m][1]))
        torch.testing.assert_close(got[row], y[row] + torch.cat(parts))
    assert weights.batch([None, None], [1, 2], torch.device("cpu")) is None


def test_the_adapter_enters_the_block_key_root():
    keys = {root_key("m", None, lora) for lora in (None, "a", "b")}
    assert len(keys) == 3
    assert root_key("m", "t", "a") == root_key("m", "t", "a")


def dequantized(w: torch.Tensor, quantization: str) -> torch.Tensor:
    """The float weights a quantized linear computes with (quantization.py's rounding)."""
    if quantization == "int4":
        return quantize_int4(w).dequantize()
    q = int8_linear(w)
    return q.weight.float() * q.scales.float().unsqueeze(-1)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_base_weights_take_the_delta_on_top(tiny_llama, adapters, quantization):
    """Reference: peft on the model whose projections hold the dequantized weights. Left
    between the two: bf16 activations in the quantized kernels, far below the adapters' effect."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("_proj.weight"):
                p.copy_(dequantized(p, quantization))
    reference = peft_reference(tiny_llama, adapters, base)
    llm = lora_llm(tiny_llama, adapters, quantization=quantization)
    ids = torch.tensor([PROMPT])
    for lora in ("a", "b"):
        reference.set_adapter(lora)
        with torch.no_grad():
            want = reference(ids).logits[0, -1]
            with reference.disable_adapter():
                plain = reference(ids).logits[0, -1]
        got = _last_logits(llm, PROMPT, lora)
        top = want.topk(8).indices  # the output head rescores its shortlist exactly (ShortlistHead)
        assert got.argmax() == want.argmax()
        assert (got[top] - want[top]).abs().max() < 0.1 * (want[top] - plain[top]).abs().max()


def _last_logits(llm: LLM, prompt: list[int], lora: str | None) -> torch.Tensor:
    """The logits chatpager computes for the token after `prompt` (one step of a fresh request)."""
    captured = []
    run = llm.engine.runner.run

    def spy(batch):
        idx, logits = run(batch)
        captured.append(logits)
        return idx, logits

    llm.engine.runner.run = spy
    try:
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, lora=lora))
    finally:
        del llm.engine.runner.run
    return captured[0][0]


def test_unknown_adapter_is_a_request_error_and_a_fork_keeps_its_parents(tiny_llama, adapters):
    llm = lora_llm(tiny_llama, adapters, quantization="none")
    with pytest.raises(RequestError, match="unknown LoRA adapter 'c'; loaded adapters: a, b"):
        llm.engine.add_request(PROMPT, SamplingParams(lora="c"))
    parent = llm.engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=4, lora="a"))
    llm.engine.step()
    with pytest.raises(RequestError, match="parent's LoRA adapter"):
        llm.engine.fork(parent, params=SamplingParams(lora="b"))
    child = llm.engine.fork(parent, params=SamplingParams(temperature=0, max_tokens=2))
    assert llm.engine.seqs[child].params.lora == "a"
    with pytest.raises(ValueError, match="lora must be"):
        SamplingParams(lora="")


def _rewrite_config(src: str, dst: Path, **changes) -> str:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return str(dst)


def test_unsupported_adapters_are_refused_naming_the_adapter_and_the_problem(tiny_llama, adapters, tmp_path,
                                                                            tiny_model_factory):
    cases = [
        (dict(use_dora=True), "DoRA"),
        (dict(bias="all"), "trained biases"),
        (dict(target_modules=["embed_tokens"]), "target_modules"),
        (dict(r=5), "do not fit rank 5"),
    ]
    for i, (changes, problem) in enumerate(cases):
        bad = _rewrite_config(adapters["a"], tmp_path / f"bad{i}", **changes)
        with pytest.raises(LoraError, match=f"LoRA adapter 'x'.*{problem}"):
            lora_llm(tiny_llama, {"x": bad})
    wider = tiny_model_factory("llama", hidden_size=96)  # another model's shapes
    with pytest.raises(LoraError, match=r"LoRA adapter 'a', layer 0 .*do not fit"):
        lora_llm(wider, {"a": adapters["a"]})
    with pytest.raises(LoraError, match="no adapter_config.json"):
        lora_llm(tiny_llama, {"x": str(tmp_path)})
    with pytest.raises(ValueError, match="max_loras is 1"):
        lora_llm(tiny_llama, adapters, max_loras=1)


class LoraPoolMachine(PoolMachine):
    """The block-pool state machine with every request under adapter "a", "b" or none: the
    invariants of PoolMachine hold, and a prefix hit never crosses adapters."""

    @initialize()
    def setup(self) -> None:
        PoolMachine.setup(self)
        self.loras: dict[bytes, str | None] = {}  # hash -> the adapter of the chain it names

    def _schedule(self, seq: Sequence, count: int, copies) -> None:
        PoolMachine._schedule(self, seq, count, copies)
        for h in seq.block_hashes[:(seq.num_computed_tokens + count) // BLOCK_SIZE]:
            self.loras.setdefault(h, seq.params.lora)

    @rule(tokens=st.lists(st.integers(0, 1), min_size=5, max_size=12), salt=st.sampled_from([None, "t"]),
          lora=st.sampled_from([None, "a", "b"]))  # two token values: chains under other adapters collide often
    def add(self, tokens, salt, lora):
        seq = Sequence(f"s{self.n}", tokens, SamplingParams(lora=lora), max_len=10**6, cache_salt=salt)
        self.n += 1
        match = self.bm.match_prefix(seq)
        for i, block in enumerate(match.blocks):  # a hit names the same chain, salt and adapter
            assert self.chains[block.block_hash] == tuple(tokens[:(i + 1) * BLOCK_SIZE])
            assert self.salts[block.block_hash] == salt and self.loras[block.block_hash] == lora
        new = seq.num_tokens - match.num_tokens(BLOCK_SIZE)
        if not self.bm.can_admit(match, new):
            return
        copies = self.bm.admit(seq, match)
        assert self.bm.allocate_slots(seq, new) == []
        self._schedule(seq, new, copies)
        self.live.append(seq)

    @precondition(lambda self: self.live and not self.scheduled)
    @rule(data=st.data())
    def fork(self, data):  # a fork runs under its parent's adapter (InputProcessor.fork_request)
        parent = data.draw(st.sampled_from(self.live))
        child = Sequence(f"s{self.n}", parent.token_ids, parent.params, max_len=10**6,
                         cache_salt=parent.cache_salt)
        self.n += 1
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)
        self.bm.fork(parent, child)
        self.live.append(child)


TestLoraPool = LoraPoolMachine.TestCase
TestLoraPool.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
