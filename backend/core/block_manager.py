"""Paged KV-cache block manager: fixed-size blocks, ref counts, a free queue and hash-based prefix caching."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from pagetron.backend.core.sequence import Sequence

ROOT_BLOCK_HASH = hashlib.sha256(b"pagetron/block-hash/root").digest()


def hash_block(parent_hash: bytes, token_ids: list[int], extra_key: bytes = b"") -> bytes:
    """Chained hash of one full block: sha256(parent || tokens as little-endian int64 || extra key)."""
    token_bytes = np.asarray(token_ids, dtype="<i8").tobytes()
    return hashlib.sha256(parent_hash + token_bytes + extra_key).digest()


class BlockManager:
    """Hands out KV-cache blocks to sequences and shares full blocks between sequences with equal prefixes.

    A block is either in use (ref count > 0, in at least one block table) or free (ref count 0, in the
    free queue exactly once). A free block may still carry the hash of the tokens it holds, so a later
    request with the same prefix can take it back instead of recomputing it.

    NOTE on eviction: allocation takes blocks from the head of the free queue and freed blocks go to its
    tail, so the least recently freed block is reused (evicted) first: an LRU over free blocks. A sequence's
    blocks are freed in reverse table order, so its tail blocks (least likely to be shared) are evicted
    before its head blocks. A cached block loses its hash only when it is reused for other tokens.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks  # hash of the tokens a block holds
        self.cached_blocks: dict[bytes, int] = {}  # block hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_cache_queries = 0  # in tokens
        self.prefix_cache_hits = 0  # in tokens

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _seq_block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """Extends ``seq.block_hashes`` to cover its first ``num_full_blocks`` blocks and returns it."""
        hashes = seq.block_hashes
        extra_key = seq.cache_salt.encode() if seq.cache_salt else b""
        bs = self.block_size
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[i - 1] if i > 0 else ROOT_BLOCK_HASH
            hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs], extra_key))
        return hashes

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], int]:
        """Longest run of cached blocks matching ``seq`` from its start: (block ids, tokens covered).

        The hit never covers the last token, so at least one token is computed and yields logits.
        A pure lookup: no ref count changes.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_hit_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self._seq_block_hashes(seq, seq.num_tokens // self.block_size)
        hit_blocks: list[int] = []
        for block_hash in hashes[:max_hit_blocks]:
            block_id = self.cached_blocks.get(block_hash)
            if block_id is None:
                break
            hit_blocks.append(block_id)
        num_hit_tokens = len(hit_blocks) * self.block_size
        return hit_blocks, num_hit_tokens

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int, hits: list[int]) -> int:
        num_covered_tokens = seq.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        return max(0, -(-num_covered_tokens // self.block_size) - len(seq.block_table) - len(hits))

    def num_blocks_to_take(self, seq: Sequence, num_new_tokens: int, hits: list[int] | None = None) -> int:
        """Free blocks that ``allocate_slots(seq, num_new_tokens, hits)`` would take: new blocks plus
        prefix hits that sit in the free queue."""
        hits = hits or []
        num_free_hits = sum(1 for block_id in hits if self.ref_counts[block_id] == 0)
        return self._num_new_blocks(seq, num_new_tokens, hits) + num_free_hits

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, new_computed_blocks: list[int] | None = None
    ) -> bool:
        """Grows ``seq.block_table`` to cover its computed tokens, the prefix hits and ``num_new_tokens``.

        Returns False and changes nothing when there are not enough free blocks. The caller advances
        ``seq.num_computed_tokens``. Passing ``new_computed_blocks`` (even empty) marks an admission: the
        prefix-cache query and hit counters (in tokens) move only when it succeeds.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        bs = self.block_size
        if new_computed_blocks is None:
            # NOTE: the common case, a running sequence's next tokens inside the blocks it holds and
            # completing none (15 of 16 decode steps): nothing to take, nothing to register
            covered = seq.num_computed_tokens + num_new_tokens
            if covered <= len(seq.block_table) * bs and (
                not self.enable_prefix_caching
                or min(covered, seq.num_tokens) // bs <= seq.num_computed_tokens // bs
            ):
                return True
        hits = new_computed_blocks or []
        if hits and (seq.block_table or seq.num_computed_tokens):
            raise ValueError("prefix-cache hits can only start an empty block table")
        if self.num_blocks_to_take(seq, num_new_tokens, hits) > self.num_free_blocks:
            return False
        num_new_blocks = self._num_new_blocks(seq, num_new_tokens, hits)
        num_covered_tokens = seq.num_computed_tokens + len(hits) * bs + num_new_tokens

        if hits:
            hashes = self._seq_block_hashes(seq, len(hits))
            for i, block_id in enumerate(hits):
                if self.block_hashes[block_id] != hashes[i]:
                    raise ValueError(f"block {block_id} is no prefix hit for block {i} of {seq!r}")
        for block_id in hits:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1
        seq.block_table.extend(hits)
        for _ in range(num_new_blocks):
            seq.block_table.append(self._take_free_block())

        if self.enable_prefix_caching:
            if new_computed_blocks is not None:  # an admission: count the lookup once it succeeds
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += len(hits) * bs
            first_block = seq.num_computed_tokens // bs  # earlier blocks were registered by earlier calls
            num_full_blocks = min(num_covered_tokens, seq.num_tokens) // bs
            self._register_blocks(seq, first_block, num_full_blocks)
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        old_hash = self.block_hashes[block_id]
        if old_hash is not None:  # evict: the block is about to hold other tokens
            if self.cached_blocks.get(old_hash) == block_id:
                del self.cached_blocks[old_hash]
            self.block_hashes[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def _register_blocks(self, seq: Sequence, first_block: int, num_full_blocks: int) -> None:
        hashes = self._seq_block_hashes(seq, num_full_blocks)
        for i in range(first_block, num_full_blocks):
            block_id = seq.block_table[i]
            block_hash = self.block_hashes[block_id]
            if block_hash is not None:  # a prefix hit, or registered by an earlier call
                if block_hash != hashes[i]:
                    raise RuntimeError(f"block {block_id} holds other tokens than block {i} of {seq!r}")
                continue
            if hashes[i] not in self.cached_blocks:  # else another block already holds these tokens
                self.cached_blocks[hashes[i]] = block_id
                self.block_hashes[block_id] = hashes[i]

    def free(self, seq: Sequence) -> None:
        """Releases the sequence's blocks, tail first; cached blocks keep their hash until reused."""
        for block_id in seq.block_table:
            if self.ref_counts[block_id] <= 0:
                raise ValueError(f"block {block_id} of {seq!r} is not in use")
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash; only allowed when no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self.cached_blocks.clear()
        self.block_hashes = [None] * self.num_blocks
        return True
