"""GGUF files read natively (`gguf_file`, `gguf_tokenizer`) against transformers reading the same
files: config, every tensor's values (dequantized by the gguf package) under the same Hugging Face
names, the tokenizer and its chat template. Tiny random models are written with mixed tensor types
(`gguf_writer`); the default model's file is read as shipped. Also: split sets, tensors that are
views of the mapped file (no copy, no float inflation in resident memory), Llama 3 RoPE from
`rope_freqs`, and one clear error per kind of bad file."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from chatpager.engine.config import ModelConfig
from chatpager.engine.model.gguf_file import GGUFFile, _llama3_scaling, hf_name
from chatpager.engine.model.gguf_writer import (
    PlannedTensor,
    hf_to_gguf,
    make_tiny_gguf,
    quantize,
    write_gguf,
)
from chatpager.engine.model.loader import default_gguf_path
from chatpager.engine.model.rope import rope_tables
from chatpager.engine.model.tiny_model import CHATML
from chatpager.errors import ModelLoadError
from chatpager.kernels.gguf_quants import BLOCKS, TYPE_IDS, GGUFMatrix
from tests.engine.model.test_tokenizer import assert_same_tokenizer

# every type chatpager runs, among the layers: K-quants need rows of 256, hence the sizes
MIXED = {"token_embd": "Q8_0", "output": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q6_K", "attn_v": "Q4_0",
         "attn_output": "F16", "ffn_gate": "Q5_K", "ffn_up": "Q4_1", "ffn_down": "Q6_K",
         "blk.1.ffn_up": "BF16", "blk.1.attn_v": "Q5_0", "blk.1.attn_output": "Q5_1", "blk.1.ffn_gate": "F32"}
SIZES = {"hidden_size": 256, "intermediate_size": 512}
LAYOUTS = {"llama": {}, "qwen2": {"tie_word_embeddings": False}, "qwen3": {"head_dim": 128}}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """tiny_gguf(arch, types=MIXED, **kw) -> path of a cached tiny GGUF model."""
    made: dict[str, Path] = {}

    def make(arch: str, types=MIXED, split_max_tensors: int = 0, **overrides) -> Path:
        key = repr((arch, sorted(types.items()), split_max_tensors, sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(arch)
            made[key] = make_tiny_gguf(folder / f"{arch}.gguf", arch, types=types,
                                       split_max_tensors=split_max_tensors, **{**SIZES, **overrides})
        return made[key]

    return make


def dequantized(t: GGUFMatrix | torch.Tensor) -> torch.Tensor:
    if not isinstance(t, GGUFMatrix):
        return t
    values = gguf.quants.dequantize(t.data.numpy(), gguf.GGMLQuantizationType(t.type_id))
    return torch.from_numpy(values.astype(np.float32))


def config_fields(raw: dict) -> dict:
    config = ModelConfig.from_dict(raw)
    return {k: getattr(config, k) for k in ModelConfig.__slots__ if k != "raw"}


def inside_map(f: GGUFFile, t: GGUFMatrix) -> bool:
    ptr = t.data.data_ptr()
    return any(p.buffer.ctypes.data <= ptr and ptr + t.nbytes <= p.buffer.ctypes.data + p.buffer.size
               for p in f.parts)


@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_config_and_every_tensor_equal_transformers_reading_of_the_file(tiny_gguf, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny_gguf(arch, **LAYOUTS[arch])
    f = GGUFFile.open(path)
    theirs = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert config_fields(f.config_dict) == config_fields(theirs.to_dict())
    weights = f.weights()
    assert {BLOCKS[weights.type_of(n)][0] for n in weights} == set(MIXED.values())
    state = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    if f.config_dict["tie_word_embeddings"]:
        state.pop("lm_head.weight")
    assert set(weights) == set(state)
    for name in weights:
        tensor = weights[name]
        assert torch.equal(dequantized(tensor), state[name]), name
        permuted = arch == "llama" and ("q_proj" in name or "k_proj" in name)
        if isinstance(tensor, GGUFMatrix):
            assert inside_map(f, tensor) != permuted, name  # a view of the file; llama q/k rows are reordered copies


def test_qwen3_reads_its_head_dim_where_transformers_assumes_128(tiny_gguf):
    """transformers maps no qwen3 key to head_dim and takes Qwen3Config's 128, so it cannot load
    this file; its metadata says 32 (attention.key_length, not hidden / heads), and the tensors agree."""
    path = tiny_gguf("qwen3", types={"*": "F32"}, head_dim=32)
    f = GGUFFile.open(path)
    source = Path(str(path) + ".hf")
    ours, theirs = config_fields(f.config_dict), config_fields(json.loads((source / "config.json").read_text()))
    assert ours.pop("rms_norm_eps") == pytest.approx(theirs.pop("rms_norm_eps"))  # stored as float32
    assert ours == theirs and ours["head_dim"] == 32
    from safetensors.torch import load_file

    reference = load_file(source / "model.safetensors")
    weights = f.weights()
    assert set(weights) == set(reference) - {"lm_head.weight"}
    for name in weights:
        assert torch.equal(dequantized(weights[name]), reference[name]), name


def test_a_split_set_loads_as_the_single_file_from_any_of_its_parts(tiny_gguf):
    whole = GGUFFile.open(tiny_gguf("llama"))
    first = tiny_gguf("llama", split_max_tensors=8)
    parts = sorted(first.parent.glob("llama-*-of-*.gguf"))
    assert first.name == "llama-00001-of-00003.gguf" and len(parts) == 3
    for entry in (first, parts[1]):
        split = GGUFFile.open(entry)
        assert split.config_dict == whole.config_dict and len(split.parts) == 3
        a, b = split.weights(), whole.weights()
        assert set(a) == set(b)
        for name in a:
            x, y = a[name], b[name]
            assert torch.equal(x.data, y.data) if isinstance(x, GGUFMatrix) else torch.equal(x, y)
        assert split.tokenizer().encode("hello") == whole.tokenizer().encode("hello")
    parts[2].rename(parts[2].with_name("elsewhere.gguf"))
    with pytest.raises(ModelLoadError, match=re.escape(f"{parts[2]} is missing")):
        GGUFFile.open(first)
    parts[2].with_name("elsewhere.gguf").rename(parts[2])
    lone = first.parent / "lone.gguf"
    lone.write_bytes(parts[1].read_bytes())
    with pytest.raises(ModelLoadError, match="part 2 of a model split into 3 files"):
        GGUFFile.open(lone)


def test_the_default_model_reads_as_transformers_reads_it():
    """Its config and tokenizer (encoding, decoding, special tokens, chat template) against
    transformers' reading; tensors against transformers' own conversion steps (the gguf
    package's dequantize, then its reverse permutation of llama q/k), on the first layer."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    path = default_gguf_path()
    f = GGUFFile.open(path)
    assert config_fields(f.config_dict) == config_fields(
        AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict())
    ours, theirs = f.tokenizer(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert_same_tokenizer(ours, theirs)
    assert ours.chat_template == theirs.chat_template == f.chat_template
    assert ours.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                   "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    assert f.eos_token_ids() == {theirs.eos_token_id, theirs.convert_tokens_to_ids("<|endoftext|>")} == {0, 2}
    assert ours.encode("2024 and 1,234") == theirs.encode("2024 and 1,234")  # digits one by one, as both split
    reader = gguf.GGUFReader(path)
    raw = {t.name: t for t in reader.tensors}
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    weights = f.weights()
    layer = ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    for name in ["token_embd.weight", "output_norm.weight"] + [f"blk.0.{p}.weight" for p in layer]:
        t = raw[name]
        expected = processor.process(gguf.quants.dequantize(t.data, t.tensor_type), name).weights
        assert torch.equal(dequantized(weights[hf_name(name)]), torch.from_numpy(np.ascontiguousarray(expected))), name
    assert len(weights) == 272 and "lm_head.weight" not in weights


def test_loading_a_gguf_imports_neither_transformers_nor_gguf(tiny_gguf):
    path = tiny_gguf("qwen2", **LAYOUTS["qwen2"])
    code = ("import sys; from chatpager.engine.model.gguf_file import GGUFFile; "
            f"f = GGUFFile.open({str(path)!r}); f.config_dict; f.tokenizer().encode('hi'); list(f.weights().values()); "
            "bad = [m for m in ('transformers', 'gguf') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_weights_are_views_of_the_file_not_copies(tmp_path):
    """A 50 MB Q8_0 model: taking every weight grows resident memory by the permuted q/k rows at
    most, not by the file (a float copy would be four times it); reading every byte of them then
    costs about the file, shared with the page cache."""
    hidden, ffn, vocab, layers = 1024, 4096, 16384, 2
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (256, hidden),
                   f"blk.{i}.attn_v.weight": (256, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                   f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ffn)}

    def blocks(shape):  # random bytes: valid layout, values never looked at
        return lambda: rng.integers(0, 256, (shape[0], shape[1] // 32 * 34), dtype=np.uint8)

    planned = [PlannedTensor(n, "F32", s, lambda s=s: np.ones(s, np.float32)) if len(s) == 1
               else PlannedTensor(n, "Q8_0", s, blocks(s)) for n, s in shapes.items()]
    metadata = {"llama.context_length": 2048, "llama.embedding_length": hidden, "llama.block_count": layers,
                "llama.feed_forward_length": ffn, "llama.attention.head_count": 16, "llama.attention.head_count_kv": 4,
                "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": vocab}
    path = write_gguf(tmp_path / "big.gguf", "llama", metadata, planned)[0]
    size = path.stat().st_size
    before = _rss()
    f = GGUFFile.open(path)
    held = list(f.weights().values())
    copied = sum(t.nbytes for t in held if isinstance(t, GGUFMatrix) and not inside_map(f, t))
    assert copied == layers * (hidden + 256) // 32 * 34 * hidden  # the llama q/k rows only
    assert _rss() - before < copied + 8 * 2**20
    assert sum(int(t.data[:, ::4096].sum()) for t in held if isinstance(t, GGUFMatrix)) > 0  # every page
    assert _rss() - before < 1.1 * size + 8 * 2**20


def test_llama3_rope_is_recovered_from_rope_freqs(tiny_gguf):
    """Llama 3.1's and 3.2's parameters come back from the divisors llama.cpp stores; on tiny
    heads (a wide band, a narrow one, every wavelength past the original context) the RoPE tables
    equal the model's."""
    from chatpager.engine.model.rope import _llama3_frequencies

    inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    for factor in (32.0, 8.0):
        params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
        got = _llama3_scaling(inv / _llama3_frequencies(inv, {**params}), 500000.0, 128, Path("x.gguf"))
        assert got.pop("rope_type") == "llama3" and got.pop("original_max_position_embeddings") == 8192
        assert got == pytest.approx({k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor")})
    for context in (128, 24, 5):  # head_dim 64
        path = tiny_gguf("llama3-rope", types={"*": "F32"}, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": context})
        assert "rope_freqs.weight" in GGUFFile.open(path).tensors
        ours = ModelConfig.from_dict(GGUFFile.open(path).config_dict)
        source = ModelConfig.from_dict(json.loads((Path(str(path) + ".hf") / "config.json").read_text()))
        for a, b in zip(rope_tables(ours, 1024), rope_tables(source, 1024)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_model_without_a_chat_template_says_so(tiny_gguf, tmp_path):
    source = Path(str(tiny_gguf("llama", types={"*": "F32"})) + ".hf")
    path = hf_to_gguf(tmp_path / "base.gguf", source, metadata={"tokenizer.chat_template": None})[0]
    f = GGUFFile.open(path)
    assert f.chat_template is None and f.tokenizer().chat_template is None
    with pytest.raises(ModelLoadError, match="no chat template"):
        f.tokenizer().apply_chat_template([{"role": "user", "content": "hi"}])


def _trained_vocab(kind: str, pre: str = "default") -> dict:
    """A few hundred tokens learned from docs/ARCHITECTURE.md, as a GGUF vocabulary: byte-level
    BPE with merges ("gpt2"), or sentencepiece pieces with scores and byte tokens ("llama")."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from chatpager.engine.model.gguf_tokenizer import _SPLITS

    text = (Path(__file__).parents[3] / "docs" / "ARCHITECTURE.md").read_text().splitlines()
    backend = Tokenizer(models.BPE())
    if kind == "llama":
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
    elif pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), "isolated"),
                                                         pre_tokenizers.ByteLevel(use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if kind == "gpt2" else []
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=700, initial_alphabet=alphabet,
                                                          show_progress=False))
    learned = sorted(backend.get_vocab(), key=backend.get_vocab().get)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if kind == "gpt2":
        tokens = specials + learned + ["<think>"]
        merges = json.loads(backend.to_str())["model"]["merges"]
        extra = {"tokenizer.ggml.merges": [" ".join(m) for m in merges], "tokenizer.ggml.pre": pre,
                 "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                 "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False}
        types = [3, 3, 3] + [1] * len(learned) + [4]
    else:
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned + specials[1:]
        types = [2, 3, 3] + [6] * 256 + [1] * len(learned) + [3, 3]
        extra = {"tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(learned))] + [0.0, 0.0],
                 "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                 "tokenizer.ggml.unknown_token_id": 0}
    return {"tokenizer.ggml.model": kind, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.chat_template": CHATML, **extra}


@pytest.mark.parametrize("kind,pre", [("gpt2", "qwen2"), ("gpt2", "gpt2"), ("llama", "default")])
def test_a_trained_vocabulary_tokenizes_as_transformers_builds_it(tmp_path, kind, pre):
    from transformers import AutoTokenizer

    path = make_tiny_gguf(tmp_path / "m.gguf", "llama", types={"*": "F32"}, metadata=_trained_vocab(kind, pre))
    ours = GGUFFile.open(path).tokenizer()
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert_same_tokenizer(ours, theirs)
    for text in ["the block pool's free queue", "  x<think>y", "<s>a</s>", "日本 🎉 2024"]:
        assert ours.encode(text) == theirs.encode(text), text
    assert (ours.encode("hi")[0] == 1) == (kind == "llama")  # sentencepiece adds BOS unless told otherwise


def test_llama3_vocabularies_take_whole_words_and_add_bos(tmp_path):
    vocab = _trained_vocab("gpt2", "llama-bpe")
    del vocab["tokenizer.ggml.add_bos_token"]  # files before mid-2024 did not say; llama.cpp adds it
    path = make_tiny_gguf(tmp_path / "m.gguf", "llama", types={"*": "F32"}, metadata=vocab)
    tokenizer = GGUFFile.open(path).tokenizer()
    assert '"ignore_merges":true' in tokenizer.backend.to_str().replace(" ", "")
    assert tokenizer.encode("the pool")[0] == 1 and tokenizer.encode("the pool", add_special_tokens=False)[0] != 1


def test_the_writer_encodes_every_type_as_the_gguf_package_decodes_it():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 512)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    x[0, :256], x[1] = 0, np.abs(x[1])  # an all-zero block, a row without negatives
    error = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q6_K": 0.03, "Q5_0": 0.06, "Q5_1": 0.05,
             "Q5_K": 0.06, "Q4_0": 0.12, "Q4_1": 0.1, "Q4_K": 0.12}
    for name in set(MIXED.values()):
        stored = quantize(x, name)
        _, block, block_bytes = BLOCKS[TYPE_IDS[name]]
        if name not in ("F32", "F16"):
            assert stored.dtype == np.uint8 and stored.shape == (6, 512 // block * block_bytes), name
        back = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType(TYPE_IDS[name]))
        assert np.abs(back - x).max(axis=1).max() <= error[name] * np.abs(x).max(), name


def _tensor_table_entry(data: bytes, name: str) -> int:
    """Offset of a tensor's entry (its name's length) in the file's tensor table."""
    entry = len(name).to_bytes(8, "little") + name.encode()
    return data.rindex(entry)


def test_bad_files_are_one_clear_error_naming_the_file(tiny_gguf, tmp_path):
    good = tiny_gguf("llama", types={"*": "F32"})
    data = good.read_bytes()
    cases = {"not a GGUF file": b"PK\x03\x04" + data[4:], "cannot read GGUF file": b"",
             "truncated: it ends inside its header": data[:2000],
             "truncated: tensor .* ends at byte": data[:len(data) - 100]}
    at = _tensor_table_entry(data, "blk.0.ffn_up.weight") + 8 + len("blk.0.ffn_up.weight") + 4 + 16
    cases["blk.0.ffn_up.weight is of type IQ2_XXS \\(16\\), which chatpager cannot run"] = (
        data[:at] + (16).to_bytes(4, "little") + data[at + 4:])
    arch = b"general.architecture" + (8).to_bytes(4, "little") + (5).to_bytes(8, "little")
    cases["unsupported architecture 'gemma'"] = data.replace(arch + b"llama", arch + b"gemma")
    for message, content in cases.items():
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(content)
        with pytest.raises(ModelLoadError, match=message) as caught:
            GGUFFile.open(bad)
        assert str(bad) in str(caught.value), message
    source = Path(str(good) + ".hf")
    for metadata, message in [({"llama.block_count": 3}, "lacks the tensor blk.2.attn_norm.weight"),
                              ({"llama.feed_forward_length": 640}, "has shape .*, the metadata implies"),
                              ({"llama.block_count": None}, "its metadata lacks llama.block_count")]:
        path = hf_to_gguf(tmp_path / "wrong.gguf", source, metadata=metadata)[0]
        with pytest.raises(ModelLoadError, match=message):
            GGUFFile.open(path).weights()


@pytest.mark.parametrize("arch,window", [("mistral", {"sliding_window": 64}),
                                         ("qwen2", {"use_sliding_window": True, "sliding_window": 64,
                                                    "max_window_layers": 0})])
def test_a_window_the_file_states_holds_on_every_layer(tiny_gguf, arch, window):
    """Mistral's file says "llama" (llama.cpp runs it as one) and is read as one, its q/k rows
    unpermuted; a window in its metadata (attention.sliding_window) windows every layer."""
    path = tiny_gguf(arch, types={"*": "F16"}, **window)
    f = GGUFFile.open(path)
    config = ModelConfig.from_dict(f.config_dict)
    assert config.model_type == ("llama" if arch == "mistral" else arch) and config.uniform_sliding_window == 64
    source = ModelConfig.from_dict(json.loads((Path(str(path) + ".hf") / "config.json").read_text()))
    assert source.uniform_sliding_window == 64
    from safetensors.torch import load_file

    reference = load_file(Path(str(path) + ".hf") / "model.safetensors")
    weights = f.weights()
    for name in weights:  # matrices F16, vectors always F32
        expected = reference[name] if reference[name].dim() == 1 else reference[name].half().float()
        assert torch.equal(dequantized(weights[name]), expected), name
