"""Exact prefix caching: whole-block hits, chained hashes, reorder losses, LRU eviction."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvlib.engine.prefix_cache import PrefixCache, hash_blocks

# Disjoint id ranges so that no two segments share a token by accident.
HEADER = list(range(1000, 1020))  # 20 tokens: system header
CHUNK_A = list(range(2000, 2040))  # 40 tokens
CHUNK_B = list(range(3000, 3037))  # 37 tokens
CHUNK_C = list(range(4000, 4025))  # 25 tokens
QUESTION = list(range(5000, 5010))  # 10 tokens


def fill(cache: PrefixCache, ids: list[int]) -> None:
    """What the runner does after a prefill: store every full block, payload = its tokens."""
    bs = cache.block_size
    cache.insert(ids, [tuple(ids[i : i + bs]) for i in range(0, len(ids) // bs * bs, bs)])


def test_repeated_prompt_hits_every_whole_block():
    cache = PrefixCache(block_size=16)
    prompt = HEADER + CHUNK_A + CHUNK_B + QUESTION  # 107 tokens: 6 full blocks + 11
    assert cache.match(prompt).n_tokens == 0
    fill(cache, prompt)
    m = cache.match(prompt)
    assert m.n_tokens == 96
    assert m.payloads == [tuple(prompt[i : i + 16]) for i in range(0, 96, 16)]
    stats = cache.stats()
    assert (stats.lookups, stats.hit_tokens, stats.total_tokens, stats.cacheable_tokens) == (2, 96, 214, 192)
    # second lookup hit all 96 cacheable tokens; over both lookups that is half of them
    assert stats.block_hit_rate == pytest.approx(0.5)
    assert stats.hit_rate == pytest.approx(96 / 214)


def test_reordered_chunks_hit_only_the_shared_prefix():
    cache = PrefixCache(block_size=16)
    fill(cache, HEADER + CHUNK_A + CHUNK_B + QUESTION)
    # Same header, same first chunk, different second chunk: 20 + 40 = 60 shared tokens,
    # so blocks 0-2 (tokens 0..47) are whole and shared; block 3 (48..63) mixes A and C.
    assert cache.match(HEADER + CHUNK_A + CHUNK_C + QUESTION).n_tokens == 48
    # Chunks swapped: only the 20 header tokens are shared, so one whole block (16).
    # CHUNK_A's blocks are cached, but at another offset behind another parent: no hit.
    assert cache.match(HEADER + CHUNK_B + CHUNK_A + QUESTION).n_tokens == 16
    # A different question after identical passages: 20 + 40 + 37 = 97 shared -> 6 blocks.
    assert cache.match(HEADER + CHUNK_A + CHUNK_B + [9] * 10).n_tokens == 96


def test_partial_block_is_never_cached_and_max_tokens_caps_the_hit():
    cache = PrefixCache(block_size=16)
    short = HEADER[:15]
    fill(cache, short)  # no full block
    assert len(cache) == 0 and cache.match(short).n_tokens == 0
    prompt = HEADER + CHUNK_A[:12]  # exactly 2 blocks
    fill(cache, prompt)
    assert cache.match(prompt).n_tokens == 32
    # the runner needs one position's logits, so it caps at len - 1, as vLLM does
    assert cache.match(prompt, max_tokens=len(prompt) - 1).n_tokens == 16


def test_chained_hash_depends_on_the_prefix():
    block = list(range(16))
    alone = hash_blocks(block)
    behind = hash_blocks([7] * 16 + block)
    assert len(alone) == 1 and len(behind) == 2
    assert alone[0] != behind[1], "same tokens behind a different parent must hash differently"
    assert hash_blocks(block, salt="model-a") != hash_blocks(block, salt="model-b")
    assert hash_blocks(block) == alone


def test_hashes_are_stable_across_processes():
    # Python's hash() would differ between these two runs; sha/blake2 must not.
    code = "from kvlib.engine.prefix_cache import hash_blocks; print(hash_blocks(list(range(40)))[1].hex())"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1 and hash_blocks(list(range(40)))[1].hex() in outs.pop()


def test_lru_evicts_leaves_first_and_match_refreshes():
    cache = PrefixCache(block_size=4, max_blocks=4)
    x, y = [1] * 12, [2] * 12  # 3 blocks each
    fill(cache, x)
    fill(cache, y)
    # 6 blocks > 4: the two least recent go, which are x's last two, never x's first
    assert len(cache) == 4
    assert cache.match(x).n_tokens == 4
    assert cache.match(y).n_tokens == 12
    cache.match(x)  # x's surviving block is now the most recent
    fill(cache, [3] * 4)
    # one eviction: y's leaf, the least recently used block
    assert (cache.match(x).n_tokens, cache.match(y).n_tokens, cache.match([3] * 4).n_tokens) == (4, 8, 4)


def test_oversized_prompt_keeps_its_prefix():
    cache = PrefixCache(block_size=4, max_blocks=2)
    fill(cache, list(range(20)))  # 5 blocks into room for 2
    assert cache.match(list(range(20))).n_tokens == 8


def test_existing_block_keeps_its_payload_and_bad_payload_count_fails():
    cache = PrefixCache(block_size=4)
    assert cache.insert([1, 2, 3, 4], ["first"]) == 1
    assert cache.insert([1, 2, 3, 4, 5, 6, 7, 8], ["second", "new"]) == 1
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8]).payloads == ["first", "new"]
    with pytest.raises(ValueError, match="2 full blocks"):
        cache.insert(list(range(9)), ["only one"])
    cache.clear()
    assert len(cache) == 0 and cache.stats().lookups == 0


def test_namespaces_never_share_a_chain():
    """The server's tenants: one LRU, and the same ids under another namespace never match."""
    cache = PrefixCache(block_size=16)
    prompt = HEADER + CHUNK_A + QUESTION
    cache.insert(prompt, [i for i in range(len(prompt) // 16)], namespace="alice")
    assert cache.match(prompt, namespace="alice").n_tokens == 64
    assert cache.match(prompt, namespace="bob").n_tokens == 0
    assert cache.match(prompt).n_tokens == 0, "no namespace is a namespace of its own"
    assert hash_blocks(prompt, 16, "s") == hash_blocks(prompt, 16, "s", ""), "without one, the hashes of before"


def test_lazy_payloads_are_made_only_for_new_blocks():
    cache = PrefixCache(block_size=16)
    made = []
    cache.insert(HEADER + CHUNK_A, lambda i: made.append(i) or i)  # 60 tokens: 3 blocks
    assert made == [0, 1, 2]
    made.clear()
    assert cache.insert(HEADER + CHUNK_A + CHUNK_B, lambda i: made.append(i) or i) == 3  # 97: 6 blocks
    assert made == [3, 4, 5], "blocks already cached are not made again"
