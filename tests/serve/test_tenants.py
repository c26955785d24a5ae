"""Tenants of chatpager serve: API keys, the loopback rule, and prefix-cache isolation."""
from __future__ import annotations

import openai
import pytest

from chatpager.cli import main as chatpager_main
from chatpager.errors import ChatpagerError
from chatpager.serve.config import check_bind, load_api_keys, ServeConfig
from tests.serve.support import serving

# longer than a few 16-token blocks, so a repeat has full blocks to hit
PROMPT = [{"role": "user", "content": "Explain how a paged KV cache shares blocks. " * 3}]
KEYS = {"key-alice": "alice", "key-bob": "bob"}


def test_keys_file_lines_are_tenant_colon_key(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# tenants\nalice: key-alice\n\nbob:key-bob\n")
    assert load_api_keys(path) == KEYS
    path.write_text("alice key-alice\n")
    with pytest.raises(ChatpagerError, match="keys.txt:1: expected 'tenant: key'"):
        load_api_keys(path)
    path.write_text("alice: same\nbob: same\n")
    with pytest.raises(ChatpagerError, match="already given to 'alice'"):
        load_api_keys(path)


def test_a_non_loopback_bind_without_keys_refuses_to_start(tiny_llama, capsys):
    with pytest.raises(ChatpagerError, match="without API keys"):
        check_bind(ServeConfig(host="0.0.0.0"))
    check_bind(ServeConfig(host="0.0.0.0", api_keys=KEYS))
    check_bind(ServeConfig(host="::1"))
    assert chatpager_main(["serve", "--host", "0.0.0.0", "--model", tiny_llama]) == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in capsys.readouterr().err


@pytest.fixture(scope="module")
def isolated(tiny_llama):
    config = ServeConfig(port=0, api_keys=KEYS, isolate_tenants=True)
    with serving(tiny_llama, config, num_blocks=128) as running:
        yield running


def test_requests_need_a_valid_bearer_key(isolated):
    with pytest.raises(openai.AuthenticationError) as wrong:
        isolated.client("key-mallory").models.list()
    assert wrong.value.status_code == 401 and wrong.value.body["code"] == "invalid_api_key"
    assert isolated.client("key-alice").models.list().data


def test_isolated_tenants_never_hit_each_others_cached_blocks(isolated):
    alice, bob = isolated.client("key-alice"), isolated.client("key-bob")
    model = alice.models.list().data[0].id

    def cached(client, **extra) -> int:
        reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=1, **extra)
        return reply.usage.prompt_tokens_details.cached_tokens

    assert cached(alice) == 0
    assert cached(alice) > 0  # within a tenant, the prefix cache works
    assert cached(bob) == 0  # the same prompt from another tenant hits nothing
    assert cached(bob) > 0
    # a request's own cache_salt narrows further, within its tenant
    assert cached(alice, extra_body={"cache_salt": "private"}) == 0
