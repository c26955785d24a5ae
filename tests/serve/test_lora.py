"""LoRA adapters through `chatpager serve` and the official openai client: `/v1/models` lists
them under the base model, a request's `model` picks one (or the base), an unknown name is
OpenAI's 404."""
from __future__ import annotations

import openai
import pytest

from chatpager.serve.config import ServeConfig
from tests.serve.support import serving
from tests.engine.model.test_lora import ADAPTERS, NEW_TOKENS, PROMPT, make_adapter, peft_greedy, peft_reference


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve-loras")
    return {name: make_adapter(tiny_llama, root / name, **spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def srv(tiny_llama, adapters):
    with serving(tiny_llama, ServeConfig(port=0), num_blocks=64, block_size=4, dtype="float32",
                 quantization="none", lora_adapters=adapters) as running:
        yield running


def test_models_lists_the_adapters_with_the_base_model_as_parent(client, srv):
    base = srv.engine.model_info["name"]
    models = client.models.list().data
    assert [m.id for m in models] == [base, "a", "b"]
    assert [m.model_extra["parent"] for m in models] == [None, base, base]


def test_the_model_field_picks_the_adapter(client, served_model, tiny_llama, adapters):
    from transformers import AutoTokenizer

    reference = peft_reference(tiny_llama, adapters)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    texts = {}
    for model, lora in ((served_model, None), ("a", "a"), ("b", "b")):
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
        want = tokenizer.decode(peft_greedy(reference, PROMPT, lora), skip_special_tokens=True)
        assert reply.choices[0].text == want
        assert reply.model == model
        texts[model] = reply.choices[0].text
    assert len(set(texts.values())) == 3
    again = client.completions.create(model="a", prompt=PROMPT, max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # "a" ran this prompt: its blocks hit


def test_an_unknown_model_is_404_naming_what_is_served(client):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="c", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.body["code"] == "model_not_found"
    assert "'c'" in unknown.value.body["message"] and "'a'" in unknown.value.body["message"]


def test_lora_flags_reach_the_llm_keywords_and_a_repeated_name_is_refused(capsys):
    from chatpager.serve.cli import parse_args

    _, engine = parse_args(["--lora", "a=/adapters/a", "--lora", "b=/adapters/b", "--max-loras", "2"])
    kwargs = engine.llm_kwargs()
    assert kwargs["lora_adapters"] == {"a": "/adapters/a", "b": "/adapters/b"} and kwargs["max_loras"] == 2
    with pytest.raises(SystemExit):
        parse_args(["--lora", "a=/x", "--lora", "a=/y"])
    assert "'a' is given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--lora", "a"])
    assert "NAME=PATH" in capsys.readouterr().err
