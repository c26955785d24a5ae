"""The tokenizer a GGUF file describes, built with the `tokenizers` library from its vocabulary.

A GGUF has no tokenizer.json: it stores the tokens, their types, the merges (byte-level BPE,
`tokenizer.ggml.model` "gpt2") or scores (sentencepiece BPE, "llama"), the special token ids and
the name of the pre-tokenizer the merges were learned with (`tokenizer.ggml.pre`). The pipeline
built here is transformers' (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, which
tests/engine/model/test_gguf_file.py holds it to), except where llama.cpp, whose files these
are, reads a file as the model's own tokenizer does and transformers does not:
- the pre-tokenizers transformers does not know by name: those that split digits one by one
  first (SmolLM's, StarCoder's) do so here, and stablelm2 / hunyuan split as Qwen2 does;
- Llama 3's and Tekken's vocabularies take a word that is a token whole (`ignore_merges`), and
  add BOS unless the file says otherwise;
- a sentencepiece vocabulary without a space prefix (`tokenizer.ggml.add_space_prefix` false)
  gets none.
Control tokens are special (whole in any text, skipped when decoding with
skip_special_tokens), user-defined ones are matched whole, as both llama.cpp and transformers do.
"""
from __future__ import annotations

from typing import Any

from chatpager.engine.model.tokenizer import Tokenizer
from chatpager.errors import ModelLoadError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types
_NAMED = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
          "pad_token": "padding_token_id"}

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
# tokenizer.ggml.pre -> the split regex its merges were learned with (the original tokenizer.json's)
_SPLITS = {
    **dict.fromkeys(_LLAMA3_NAMES + ("jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan"), _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}
# GPT-2's regex after splitting every digit apart
_SINGLE_DIGITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_WHOLE_WORDS = _LLAMA3_NAMES + ("tekken",)  # llama.cpp: ignore_merges, and BOS by default


def gguf_tokenizer(metadata: dict[str, Any], chat_template: str | None, source: str) -> Tokenizer:
    """The tokenizer of a GGUF file's metadata; `source` names the file in errors."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{source}: has no vocabulary (tokenizer.ggml.tokens)")
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if kind == "gpt2":
        backend = _byte_level_bpe(tokens, metadata.get("tokenizer.ggml.merges"), pre)
    elif kind == "llama":
        backend = _sentencepiece_bpe(tokens, metadata.get("tokenizer.ggml.merges"),
                                     metadata.get("tokenizer.ggml.scores"),
                                     metadata.get("tokenizer.ggml.add_space_prefix", True))
    else:
        raise ModelLoadError(f"{source}: its tokenizer is {kind!r}; chatpager builds byte-level BPE ('gpt2') "
                             "and sentencepiece BPE ('llama') vocabularies")
    special = {name: tokens[i] for name, key in _NAMED.items()
               if isinstance(i := metadata.get(f"tokenizer.ggml.{key}"), int) and 0 <= i < len(tokens)}
    _add_tokens(backend, tokens, types, special, byte_level=kind == "gpt2")
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama" or pre in _WHOLE_WORDS)
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    _add_bos_eos(backend, special.get("bos_token") if add_bos else None, special.get("eos_token") if add_eos else None)
    return Tokenizer(backend, special, chat_template)


def _byte_level_bpe(tokens: list[str], merges: list[str] | None, pre: str):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # a token written in plain text rather than the byte alphabet is respelled, as transformers does
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else _merges_from_vocab(vocab, None)
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False, ignore_merges=pre in _WHOLE_WORDS))
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _SINGLE_DIGITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:  # "gpt2", "default" and names not known here: GPT-2's own
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], merges: list[str] | None, scores: list[float] | None,
                       space_prefix: bool):
    """Sentencepiece's BPE as Hugging Face's Llama tokenizer runs it: merges (from the file, or
    recovered from the scores of the pieces they make), <0xNN> byte fallback, ▁ for spaces."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = _merges_from_vocab(vocab, dict(zip(tokens, scores)) if scores else None)
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if space_prefix
                                                     else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_vocab(vocab: dict[str, int], scores: dict[str, float] | None) -> list[tuple[str, str]]:
    """The merges a vocabulary implies: every split of a token into two tokens, ordered by the
    merged token's score (best first), else by its id. transformers' `generate_merges`, whose
    order (ties included) decides how its tokenizer merges, so this one keeps it."""
    ranked = scores if scores is not None else vocab
    merges = []
    for token, rank in ranked.items():
        local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=scores is not None)
    return [(left, right) for left, right, _ in merges]


def _add_tokens(backend, tokens: list[str], types: list[int], special: dict[str, str], byte_level: bool) -> None:
    from tokenizers import AddedToken

    spelled = set(_bytes_to_unicode().values()) if byte_level else None
    # a byte-level control token outside the byte alphabet is a mislabel llama.cpp makes; adding
    # it would grow the vocabulary past the model's (transformers skips it too)
    control = [t for t, kind in zip(tokens, types) if kind == CONTROL and (spelled is None or set(t) <= spelled)]
    named = [t for t in special.values() if t not in control and backend.token_to_id(t) is not None]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control + named])
    user = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED and backend.token_to_id(t) is not None]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _add_bos_eos(backend, bos: str | None, eos: str | None) -> None:
    from tokenizers import processors

    if bos is None and eos is None:
        return
    def around(seq: str, type_id: int) -> list[str]:
        return [f"{bos}:{type_id}"] * bool(bos) + [f"${seq}:{type_id}"] + [f"{eos}:{type_id}"] * bool(eos)

    backend.post_processor = processors.TemplateProcessing(
        single=around("A", 0), pair=around("A", 0) + around("B", 1),
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(filter(None, (bos, eos)))])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest for 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in spelling):
        spelling[b] = chr(256 + n)
    return spelling
