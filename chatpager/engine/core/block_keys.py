"""Prefix-cache keys: a SHA-256 chain over the token blocks of a sequence.

    root     = SHA-256(b"chatpager-kv-v1" || JSON[model identity, cache salt, LoRA adapter])
    key(i)   = SHA-256(key(i - 1) || token ids of full block i as 8-byte ints), key(-1) = root

Invariants:
- Equal keys name equal token chains from the start of a sequence under equal extra keys: the
  parent key has a fixed width (32 bytes) and tokens a fixed width (8 bytes each), so the
  bytes hashed are unambiguous, and nobody can produce a SHA-256 collision. A hit therefore
  never serves another prompt's K/V (Python's 64-bit `hash()` gave no such promise, cf.
  vLLM's CVE-2025-25183), and no token check is needed on a hit.
- The extra keys enter the root, so every block of a chain depends on them: requests with
  different cache salts (tenants), models or adapters never share a block.
Cost: one SHA-256 over 32 + 8 * block_size bytes per full block (the block-management
benchmark prints it per token).
"""
from __future__ import annotations

import hashlib
import json
from array import array
from typing import Sequence

BlockKey = bytes
KEY_VERSION = b"chatpager-kv-v1"
assert array("q").itemsize == 8  # the fixed token width the keys rely on


def root_key(model: str | None, cache_salt: str | None = None, lora: str | None = None) -> BlockKey:
    """The parent key of a sequence's first block: everything besides tokens that K/V depend on."""
    extra = json.dumps([model, cache_salt, lora], ensure_ascii=False).encode()
    return hashlib.sha256(KEY_VERSION + extra).digest()


def block_key(parent: BlockKey, token_ids: Sequence[int]) -> BlockKey:
    """Key of a full block holding `token_ids`, whose chain so far is named by `parent`."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()
