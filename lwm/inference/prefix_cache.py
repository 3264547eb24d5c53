"""The prefix cache: KV blocks of earlier prompts, reused by later prompts that begin with the same tokens.

Many questions of one long context (a document, a video, a conversation's earlier turns, a needle eval's
haystack) share a prefix. The engine's prefix-cached prefill (`Engine.prefill(..., prefix_cache=pc)`) lays a
prompt's cache out from slot 0 and cuts it into blocks of `block_size` slots; block j holds the keys and values
of tokens [j * B, (j + 1) * B). A key's value depends only on the tokens at and before it and on its position
id (RoPE rotates by the position, not the slot), so a block computed for one prompt is exact for every prompt
that starts with the same j + 1 blocks of tokens (vLLM's automatic prefix caching hashes KV blocks the same way;
SGLang's RadixAttention keeps a token tree).

Keys. Block j's key is a hash of the key of block j - 1 and block j's own tokens (and vision mask: a vision
code id and the text id with the same number are different tokens), so it names the whole prefix up to and
including the block (`block_key`): two prompts that differ anywhere before a block never share it. A
cache keyed by the block's own tokens alone would serve a block computed after another prefix
(tests/inference/test_prefix_cache.py keeps that as its negative control). BLAKE2b of the little-endian int32
ids: the same on every host, so the processes of a multi-host server agree on hits.

Memory. Blocks are device arrays in the cache's own dtype (an int8 / fp8 cache's blocks carry their scales),
held under `budget_bytes`; when a new block does not fit, the least recently used blocks are evicted. A
lookup touches every block it matches, so a conversation's or a document's blocks stay while they are asked
about. The engine writes matched blocks into a new prompt's cache (a copy of B slots each: the blocks stay
valid however the prompt's cache then changes) and prefills only the tokens after them.

Letters: L layers, K kv heads, B block_size (slots per block), H head dim.
"""
from __future__ import annotations

import collections
import hashlib
import os
from typing import Optional, Sequence

import numpy as np


def default_budget_bytes(fraction: float = 0.25) -> int:
    """The budget `--prefix_cache_mb` -1 means: `fraction` of the first device's free memory (bytes_limit -
    bytes_in_use of its memory_stats, as on GPU and TPU); on a backend without memory stats (CPU), the same
    fraction of the host's available memory (/proc/meminfo MemAvailable), at most 4 GiB."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}   # this process's (another host's has no stats here)
    if "bytes_limit" in stats:
        return int(fraction * max(0, stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    available = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(min(fraction * available, 4 << 30))


def block_key(previous: bytes, tokens: np.ndarray, vision: Optional[np.ndarray]) -> bytes:
    """The key of a block: BLAKE2b-128 of the previous block's key (b'' for block 0), the block's ids as
    little-endian int32 and, for a vision-language prompt, its vision mask (packed bits)."""
    h = hashlib.blake2b(previous, digest_size=16)
    h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    if vision is not None:
        h.update(b"v" + np.packbits(np.asarray(vision, bool)).tobytes())
    return h.digest()


class PrefixCache:
    """KV blocks by prefix key, least recently used evicted first (module docstring).

    block_size: B, slots per block (the engine asks for a multiple of the model's decode_chunk_size);
    budget_bytes: the most the blocks may hold; block_bytes: one block's size (`Engine.prefix_cache` computes
    it from the model and cache dtype). Raises ValueError (naming --prefix_cache_mb) for a budget that holds
    no block. Counters: `lookups`, `hit_tokens` (tokens served from blocks), `evictions`, and `stats()`."""

    def __init__(self, block_size: int, budget_bytes: int, block_bytes: int):
        if block_size < 1:
            raise ValueError(f"prefix cache block_size={block_size}: must be >= 1")
        if budget_bytes < block_bytes:
            raise ValueError(
                f"--prefix_cache_mb={budget_bytes / 2**20:g} holds no block: one block of {block_size} tokens "
                f"takes {block_bytes / 2**20:.3g} MiB; raise it, or give 0 to turn the prefix cache off")
        self.block_size, self.budget_bytes, self.block_bytes = int(block_size), int(budget_bytes), int(block_bytes)
        self._blocks: "collections.OrderedDict[bytes, dict]" = collections.OrderedDict()
        self.lookups = self.hit_tokens = self.evictions = 0

    def key(self, previous: bytes, tokens: np.ndarray, vision: Optional[np.ndarray]) -> bytes:
        """The key of one block after `previous` (`block_key`); a method so a test can key differently."""
        return block_key(previous, tokens, vision)

    def keys(self, tokens: Sequence[int], vision: Optional[Sequence[bool]] = None, limit: Optional[int] = None):
        """The keys of the whole blocks of `tokens` (at most `limit` of them), in order."""
        ids = np.asarray(tokens, np.int32)
        vis = None if vision is None else np.asarray(vision, bool)
        n = len(ids) // self.block_size if limit is None else min(limit, len(ids) // self.block_size)
        out, prev = [], b""
        for j in range(n):
            s = slice(j * self.block_size, (j + 1) * self.block_size)
            prev = self.key(prev, ids[s], None if vis is None else vis[s])
            out.append(prev)
        return out

    def match(self, keys: Sequence[bytes]) -> list:
        """The blocks of the longest run of `keys` held from the first, in order (each marked as just used)."""
        self.lookups += 1
        found = []
        for k in keys:
            block = self._blocks.get(k)
            if block is None:
                break
            self._blocks.move_to_end(k)
            found.append(block)
        self.hit_tokens += len(found) * self.block_size
        return found

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def put(self, key: bytes, block: dict) -> None:
        """Hold `block` (dict of device arrays, the cache entries of B slots) under `key`, evicting the least
        recently used blocks until it fits the budget."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        while self._blocks and (len(self._blocks) + 1) * self.block_bytes > self.budget_bytes:
            self._blocks.popitem(last=False)
            self.evictions += 1
        self._blocks[key] = block

    def clear(self) -> None:
        self._blocks.clear()

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def bytes(self) -> int:
        """Bytes the held blocks take."""
        return len(self._blocks) * self.block_bytes

    def stats(self) -> dict:
        return dict(blocks=len(self._blocks), block_size=self.block_size, bytes=self.bytes,
                    budget_bytes=self.budget_bytes, lookups=self.lookups, hit_tokens=self.hit_tokens,
                    evictions=self.evictions)
