"""The block pool on its own: allocation, release, prefix hits and LRU eviction."""
from llmserve import SamplingParams
from llmserve.kv_cache import KVCacheManager
from llmserve.request import Request


def request(tokens: list[int]) -> Request:
    return Request("r", tokens, SamplingParams(), max_len=1000)


def test_allocate_grows_and_release_returns_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    r = request(list(range(6)))
    assert kv.allocate(r, 6) and len(r.block_ids) == 2
    r.num_computed_tokens = 6
    assert kv.allocate(r, 2) and len(r.block_ids) == 2  # 8 tokens still fit in two blocks
    r.num_computed_tokens = 8
    assert kv.allocate(r, 1) and len(r.block_ids) == 3
    assert not kv.allocate(request([1] * 9), 9)  # needs 3 blocks, 1 is free
    kv.release(r)
    assert kv.num_free_blocks == 4 and r.block_ids == []


def test_prefix_hit_reuses_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = request(list(range(10)))
    kv.allocate(first, 10)
    first.num_computed_tokens = 10
    kv.cache_computed_blocks(first)
    blocks = list(first.block_ids)
    kv.release(first)
    same_prefix = request(list(range(8)) + [99, 98])
    assert kv.find_cached_prefix(same_prefix) == blocks[:2]
    assert kv.allocate(same_prefix, 2, blocks[:2]) and same_prefix.block_ids[:2] == blocks[:2]
    kv.release(same_prefix)
    exact = request(list(range(8)))
    assert len(kv.find_cached_prefix(exact)) == 1  # 8 tokens: the last block is recomputed for a logit
    other = request([7] + list(range(1, 8)))
    assert kv.find_cached_prefix(other) == []


def test_lru_evicts_unused_cached_blocks():
    kv = KVCacheManager(num_blocks=2, block_size=2, enable_prefix_caching=True)
    a = request([1, 2, 3])
    kv.allocate(a, 3)
    a.num_computed_tokens = 3
    kv.cache_computed_blocks(a)
    kv.release(a)
    assert len(kv.cached) == 1
    b = request([5, 6, 7, 8])
    assert kv.allocate(b, 4)  # takes both blocks, evicting the cached one
    assert kv.cached == {}
    kv.release(b)
