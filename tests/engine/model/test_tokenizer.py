"""chatpager's tokenizer (tokenizers + jinja2, no transformers at run time) against transformers'
AutoTokenizer on the same files: encoding, decoding, special tokens, chat templates, and the
incremental detokenizer fed by each. The default model's files are its cached conversion."""
from __future__ import annotations

import random

import pytest
from jinja2.exceptions import TemplateError

from chatpager.engine.detokenizer import Detokenizer
from chatpager.engine.model.loader import resolve_model_dir
from chatpager.engine.model.tokenizer import Tokenizer
from chatpager.errors import ModelLoadError

TEXTS = ["", "Hello, world!", "  leading and trailing spaces  ", "line\nbreaks\n\n\ttabs",
         "héllo wörld — “quotes” 日本語のテキスト 🎉👍🏽", "<|im_start|>user\nhi<|im_end|>", "a<|im_end|>b",
         "numbers 1234567890 3.14159 and code: def f(x): return x**2"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 日本 🎉"}],
    [{"role": "user", "content": "x", "name": None}],  # a None field is dropped, as transformers drops it
]


def _pair(model_dir):
    from transformers import AutoTokenizer

    return Tokenizer.from_dir(model_dir), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def default_pair():
    return _pair(resolve_model_dir(None))


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny_pair(request, tiny_model_factory):
    return _pair(tiny_model_factory(request.param))


def _random_ids(rng: random.Random, size: int, n: int, specials: list[int]) -> list[int]:
    return [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(size) for _ in range(n)]


def assert_same_tokenizer(ours: Tokenizer, theirs) -> None:
    assert len(ours) == len(theirs)
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        ids = theirs.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    rng = random.Random(0)
    specials = sorted(theirs.all_special_ids)
    for _ in range(50):
        ids = _random_ids(rng, len(theirs), rng.randrange(1, 12), specials)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), ids
    for conv in CONVERSATIONS:
        for gen in (False, True):
            expected = theirs.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False) == expected
            expected_ids = theirs.apply_chat_template(conv, add_generation_prompt=gen, return_dict=False)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == list(expected_ids)


def test_default_model_tokenizer_equals_transformers(default_pair):
    assert_same_tokenizer(*default_pair)


def test_tiny_model_tokenizers_equal_transformers(tiny_pair):
    assert_same_tokenizer(*tiny_pair)


def detokenize(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    """The deltas a request streams as `ids` arrive one at a time, and its final text."""
    detok, deltas = Detokenizer(), []
    for n in range(1, len(ids) + 1):
        deltas.append(detok.update(tokenizer, ids[:n]))
    detok.flush(tokenizer, ids)
    return deltas, detok.text


def test_incremental_detokenization_is_unchanged(default_pair):
    """Streaming with our tokenizer gives the same deltas as with transformers', multi-byte
    characters split over byte-level tokens and special tokens included."""
    ours, theirs = default_pair
    rng = random.Random(1)
    texts = [t for t in TEXTS if t] + ["日本語🎉" * 3 + " end"]
    cases = [theirs.encode(t) for t in texts]
    cases += [_random_ids(rng, len(theirs), 20, sorted(theirs.all_special_ids)) for _ in range(20)]
    for ids in cases:
        assert detokenize(ours, ids) == detokenize(theirs, ids), ids
    deltas, text = detokenize(ours, theirs.encode("日本語🎉"))
    assert "" in deltas and text == "日本語🎉"  # some tokens held back until a character completes


def _byte_fallback_backend():
    """A Llama-2-style tokenizer: sentencepiece pieces, <0xNN> byte tokens for everything else."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "h", "i", "▁h", "▁hi", "e", "r", "t"]:
        vocab[piece] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i")], unk_token="<unk>",
                                 byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return backend


def test_byte_fallback_decoding_equals_transformers(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=_byte_fallback_backend(), bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    ours, theirs = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in ["hi thére", "hé 日本 🎉", "hi</s>hé"]:
        ids = theirs.encode(text)
        assert any(3 <= i < 259 for i in ids)  # byte tokens in play
        assert ours.encode(text) == ids
        assert detokenize(ours, ids) == detokenize(theirs, ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_a_template_that_raises_raises_template_error(tiny_llama, tmp_path):
    import json
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}ok")
    with pytest.raises(TemplateError, match="system first"):
        Tokenizer.from_dir(tmp_path / "m").apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "m" / "chat_template.jinja").unlink()  # then tokenizer_config.json's, if any
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}|{{ eos_token }}|{{ messages | tojson }}"
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = _pair(tmp_path / "m")
    conv = [{"role": "user", "content": "<b>é</b>"}]
    assert ours.apply_chat_template(conv, tokenize=False) == theirs.apply_chat_template(conv, tokenize=False)


def test_a_corrupt_tokenizer_file_is_a_clear_error(tiny_llama, tmp_path):
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{\"truncated\": ")
    with pytest.raises(ModelLoadError, match="cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path / "m")


def test_a_checkpoint_without_tokenizer_json_gets_one_made_once(tmp_path, monkeypatch):
    """A GPT-2-style vocab.json + merges.txt only: transformers builds the tokenizer once, its
    tokenizer.json is cached, and later loads read that without transformers."""
    import json

    import transformers
    from tokenizers import pre_tokenizers

    from chatpager.engine.model.loader import load_tokenizer

    monkeypatch.setenv("CHATPAGER_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"he": 256, "Ġt": 257, "<|im_end|>": 258})
    (model / "vocab.json").write_text(json.dumps(vocab))
    (model / "merges.txt").write_text("#version: 0.2\nh e\nĠ t\n")
    (model / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "eos_token": "<|im_end|>", "bos_token": "<|im_end|>",
        "unk_token": "<|im_end|>", "chat_template": "{% for m in messages %}{{ m.content + eos_token }}{% endfor %}"}))
    theirs = transformers.AutoTokenizer.from_pretrained(model)
    ours = load_tokenizer(model)
    text, conv = "the heat <|im_end|> tea", [{"role": "user", "content": "the"}]
    assert ours.encode(text) == theirs.encode(text)
    assert 256 in ours.encode(text) and ours.eos_token_id == theirs.eos_token_id == 258
    assert ours.apply_chat_template(conv) == theirs.apply_chat_template(conv, return_dict=False)

    def no_transformers(*args, **kwargs):
        raise AssertionError("the cached tokenizer.json should have been read")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_transformers)
    assert load_tokenizer(model).encode(text) == theirs.encode(text)
    (model / "merges.txt").write_text("#version: 0.2\nh e\n")  # a changed vocabulary converts again
    with pytest.raises(ModelLoadError, match="cannot load tokenizer"):
        load_tokenizer(model)
