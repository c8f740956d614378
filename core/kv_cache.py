"""The KV block pool: per-request block tables, and a prefix cache of full blocks keyed by chained hashes."""
from collections import OrderedDict

from llmserve.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order, oldest first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def hash_full_blocks(self, request: Request) -> None:
        """Extend request.block_hashes over every full block of its tokens: hash(parent hash, block tokens)."""
        size, hashes = self.block_size, request.block_hashes
        for start in range(len(hashes) * size, request.num_tokens - size + 1, size):
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, tuple(request.token_ids[start:start + size]))))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks holding a prefix of the request's tokens; at least one prompt token is left to compute."""
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        self.hash_full_blocks(request)
        usable = (request.num_tokens - 1) // self.block_size
        blocks = []
        for block_hash in request.block_hashes[:usable]:
            block = self.cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens (after taking `cached_blocks`); False if full."""
        needed_tokens = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        if not cached_blocks and needed_tokens <= len(request.block_ids) * self.block_size:
            return True  # the common decode step: its last block has room
        new_blocks = -(-needed_tokens // self.block_size) - len(request.block_ids) - len(cached_blocks)
        reusable = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)  # taking them removes them from `free`
        if new_blocks > len(self.free) - reusable:
            return False
        for block in cached_blocks:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        request.block_ids.extend(cached_blocks)
        for _ in range(max(new_blocks, 0)):
            request.block_ids.append(self.take_free_block())
        return True

    def take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.block_hash[block] is not None:  # evict it from the prefix cache
            if self.cached.get(self.block_hash[block]) == block:
                del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def cache_computed_blocks(self, request: Request) -> None:
        """Publish the request's full, computed blocks to the prefix cache."""
        full = min(request.num_computed_tokens, request.num_tokens) // self.block_size  # never a token not yet sampled
        if not self.enable_prefix_caching or full <= request.num_published_blocks:
            return
        self.hash_full_blocks(request)
        for i in range(request.num_published_blocks, full):
            block = request.block_ids[i]
            if self.block_hash[block] is None:
                self.block_hash[block] = request.block_hashes[i]
                self.cached.setdefault(request.block_hashes[i], block)
        request.num_published_blocks = full

    def release(self, request: Request) -> None:
        """Return the request's blocks; cached ones stay findable until reused. Tail blocks are evicted first."""
        for block in reversed(request.block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        request.block_ids = []
        request.num_published_blocks = 0
