import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagetron.backend.core.block_manager import ROOT_BLOCK_HASH, BlockManager, hash_block
from pagetron.backend.core.sampling_params import SamplingParams
from pagetron.backend.core.sequence import Sequence


def make_seq(token_ids, cache_salt=None) -> Sequence:
    return Sequence(list(token_ids), SamplingParams(), cache_salt=cache_salt)


def admit(bm: BlockManager, seq: Sequence) -> tuple[list[int], int]:
    """What the scheduler does for a waiting sequence: look up hits, allocate the rest, compute it all."""
    hits, num_hit_tokens = bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - num_hit_tokens, hits)
    seq.num_computed_tokens = seq.num_tokens
    return hits, num_hit_tokens


def snapshot(bm: BlockManager, *seqs: Sequence):
    return (
        list(bm.ref_counts),
        list(bm.free_queue),
        dict(bm.cached_blocks),
        list(bm.block_hashes),
        bm.num_free_blocks,
        [(list(s.block_table), list(s.block_hashes), s.num_computed_tokens) for s in seqs],
    )


def test_block_hash_is_chained_sha256_of_int64_tokens_and_salt():
    seq = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], cache_salt="lora-a")
    bm = BlockManager(4, block_size=4)
    bm.get_computed_blocks(seq)
    assert ROOT_BLOCK_HASH == hashlib.sha256(b"pagetron/block-hash/root").digest()
    h0 = hashlib.sha256(ROOT_BLOCK_HASH + struct.pack("<4q", 1, 2, 3, 4) + b"lora-a").digest()
    h1 = hashlib.sha256(h0 + struct.pack("<4q", 5, 6, 7, 8) + b"lora-a").digest()
    assert seq.block_hashes == [h0, h1]  # only full blocks are hashed
    assert hash_block(ROOT_BLOCK_HASH, [1, 2, 3, 4]) != hash_block(ROOT_BLOCK_HASH, [1, 2, 3, 5])
    # The same tokens after a different parent hash differently.
    assert hash_block(h0, [5, 6, 7, 8]) != hash_block(ROOT_BLOCK_HASH, [5, 6, 7, 8])


def test_first_allocations_take_blocks_in_order():
    bm = BlockManager(10, block_size=16)
    assert (bm.num_free_blocks, bm.usage) == (10, 0.0)
    a, b = make_seq(range(40)), make_seq(range(100, 117))
    admit(bm, a)
    admit(bm, b)
    assert a.block_table == [0, 1, 2]
    assert b.block_table == [3, 4]
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(0.5)
    assert bm.ref_counts == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    # Only full blocks are cached: a's block 2 (8 tokens) and b's block 4 (1 token) are not.
    assert bm.cached_blocks == {a.block_hashes[0]: 0, a.block_hashes[1]: 1, b.block_hashes[0]: 3}


def test_shared_prefix_ref_counts_hits_and_free_order():
    bm = BlockManager(10, block_size=16)
    a = make_seq(range(40))
    assert admit(bm, a) == ([], 0)
    b = make_seq(list(range(32)) + list(range(500, 508)))
    hits, num_hit_tokens = bm.get_computed_blocks(b)
    assert (hits, num_hit_tokens) == ([0, 1], 32)
    assert bm.ref_counts[:4] == [1, 1, 1, 0]  # lookup alone changes nothing
    assert bm.allocate_slots(b, 8, hits)
    assert b.block_table == [0, 1, 3]
    assert bm.ref_counts[:5] == [2, 2, 1, 1, 0]
    assert bm.num_free_blocks == 6
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (80, 32)

    bm.free(a)
    assert bm.ref_counts[:4] == [1, 1, 0, 1]
    assert list(bm.free_queue) == [4, 5, 6, 7, 8, 9, 2]
    assert (a.block_table, a.num_computed_tokens) == ([], 0)
    bm.free(b)
    assert list(bm.free_queue) == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]
    assert (bm.num_free_blocks, bm.usage) == (10, 0.0)


def test_hit_never_covers_the_last_token():
    bm = BlockManager(8, block_size=16)
    a = make_seq(range(32))
    admit(bm, a)
    assert bm.cached_blocks == {a.block_hashes[0]: 0, a.block_hashes[1]: 1}
    same = make_seq(range(32))
    assert admit(bm, same) == ([0], 16)
    assert same.block_table == [0, 2]
    # Block 2 holds the same tokens as block 1, which already caches them: no duplicate entry.
    assert same.block_hashes[1] == a.block_hashes[1]
    assert bm.block_hashes[2] is None
    assert bm.cached_blocks == {a.block_hashes[0]: 0, a.block_hashes[1]: 1}
    assert bm.ref_counts[:3] == [2, 1, 1]
    assert bm.get_computed_blocks(make_seq(range(33))) == ([0, 1], 32)
    assert bm.get_computed_blocks(make_seq(range(16))) == ([], 0)
    assert bm.get_computed_blocks(make_seq(range(17))) == ([0], 16)
    # only admissions count (a lookup that is retried or never admitted is not a query)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (32 + 32, 16)


def test_identical_prompts_admitted_in_the_same_step_are_not_cached_twice():
    bm = BlockManager(8, block_size=4)
    a, b = make_seq(range(9)), make_seq(range(9))
    lookups = [bm.get_computed_blocks(a), bm.get_computed_blocks(b)]
    assert lookups == [([], 0), ([], 0)]
    assert bm.allocate_slots(a, 9) and bm.allocate_slots(b, 9)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3, 4, 5])
    assert bm.cached_blocks == {a.block_hashes[0]: 0, a.block_hashes[1]: 1}
    assert bm.block_hashes[3:6] == [None, None, None]


def test_freed_cached_blocks_are_hit_until_reused_then_evicted():
    bm = BlockManager(6, block_size=16)
    a = make_seq(range(48))
    admit(bm, a)
    assert a.block_table == [0, 1, 2]
    bm.free(a)
    assert list(bm.free_queue) == [3, 4, 5, 2, 1, 0]  # tail first, so a's head is evicted last
    assert bm.num_free_blocks == 6

    c = make_seq(range(1000, 1032))
    assert admit(bm, c) == ([], 0)
    assert c.block_table == [3, 4]  # never-used blocks come first only because they are at the head
    assert list(bm.free_queue) == [5, 2, 1, 0]

    a2 = make_seq(range(40))
    hits, _ = bm.get_computed_blocks(a2)
    assert hits == [0, 1]
    assert bm.allocate_slots(a2, 8, hits)
    assert a2.block_table == [0, 1, 5]  # hits leave the free queue, the new block comes from its head
    assert bm.ref_counts == [1, 1, 0, 1, 1, 1]
    assert list(bm.free_queue) == [2]
    assert bm.cached_blocks[a.block_hashes[2]] == 2  # freed but still cached

    d = make_seq(range(2000, 2016))
    admit(bm, d)
    assert d.block_table == [2]
    assert a.block_hashes[2] not in bm.cached_blocks  # evicted by reuse
    assert bm.block_hashes[2] == d.block_hashes[0]
    assert bm.num_free_blocks == 0

    for seq in (c, a2, d):
        bm.free(seq)
    assert list(bm.free_queue) == [4, 3, 5, 1, 0, 2]
    assert bm.get_computed_blocks(make_seq(range(49))) == ([0, 1], 32)
    assert bm.get_computed_blocks(make_seq(range(2000, 2017))) == ([2], 16)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (48 + 32 + 40 + 16, 32)  # admissions only


def test_failed_allocation_changes_nothing():
    bm = BlockManager(4, block_size=16)
    a = make_seq(range(48))
    admit(bm, a)
    bm.free(a)
    assert list(bm.free_queue) == [3, 2, 1, 0]

    # 70 tokens need 5 blocks: 2 free cached hits + 3 new > 4 free blocks (the hits consume free blocks too).
    b = make_seq(list(range(32)) + list(range(900, 938)))
    hits, num_hit_tokens = bm.get_computed_blocks(b)
    assert (hits, num_hit_tokens) == ([0, 1], 32)
    before = snapshot(bm, a, b)
    assert not bm.allocate_slots(b, 38, hits)
    assert snapshot(bm, a, b) == before

    # 62 tokens need 4 blocks: 2 hits + 2 new fits exactly, and evicts block 2's hash.
    b62 = make_seq(list(range(32)) + list(range(900, 930)))
    hits, num_hit_tokens = bm.get_computed_blocks(b62)
    assert bm.allocate_slots(b62, 30, hits)
    assert b62.block_table == [0, 1, 3, 2]
    assert bm.cached_blocks == {a.block_hashes[0]: 0, a.block_hashes[1]: 1, b62.block_hashes[2]: 3}
    b62.num_computed_tokens = 62

    # A running sequence that cannot grow keeps its table.
    for token in (7, 8, 9):
        b62.append_token(token)
    before = snapshot(bm, b62)
    assert not bm.allocate_slots(b62, 3)  # 65 tokens need a fifth block
    assert snapshot(bm, b62) == before
    assert bm.allocate_slots(b62, 2)  # 64 tokens still fit in 4 blocks
    assert b62.block_table == [0, 1, 3, 2]


def test_decode_growth_takes_a_block_at_each_boundary_and_caches_full_blocks():
    bm = BlockManager(4, block_size=4)
    seq = make_seq([1, 2, 3])
    admit(bm, seq)
    assert seq.block_table == [0]
    assert bm.cached_blocks == {}
    history = []
    for token in range(4, 14):
        seq.append_token(token)
        assert bm.allocate_slots(seq, 1)
        seq.num_computed_tokens += 1
        cached = [b for b in seq.block_table if bm.block_hashes[b] is not None]
        history.append((seq.num_tokens, list(seq.block_table), cached))
    assert history == [
        (4, [0], [0]),
        (5, [0, 1], [0]),
        (6, [0, 1], [0]),
        (7, [0, 1], [0]),
        (8, [0, 1], [0, 1]),
        (9, [0, 1, 2], [0, 1]),
        (10, [0, 1, 2], [0, 1]),
        (11, [0, 1, 2], [0, 1]),
        (12, [0, 1, 2], [0, 1, 2]),
        (13, [0, 1, 2, 3], [0, 1, 2]),
    ]
    assert bm.get_computed_blocks(make_seq(range(1, 14))) == ([0, 1, 2], 12)


def test_chunked_prefill_registers_blocks_as_they_fill():
    bm = BlockManager(8, block_size=4)
    seq = make_seq(range(10))
    assert bm.allocate_slots(seq, 6)
    assert seq.block_table == [0, 1]
    assert bm.cached_blocks == {seq.block_hashes[0]: 0}
    seq.num_computed_tokens = 6
    assert bm.allocate_slots(seq, 4)
    assert seq.block_table == [0, 1, 2]
    assert bm.cached_blocks == {seq.block_hashes[0]: 0, seq.block_hashes[1]: 1}
    # Slots past the sequence's tokens are allocated but never cached.
    seq.num_computed_tokens = 10
    assert bm.allocate_slots(seq, 3)
    assert seq.block_table == [0, 1, 2, 3]
    assert len(bm.cached_blocks) == 2


def test_cache_salt_separates_identical_tokens():
    bm = BlockManager(10, block_size=4)
    admit(bm, make_seq(range(8), cache_salt="a"))
    assert bm.get_computed_blocks(make_seq(range(9), cache_salt="b")) == ([], 0)
    assert bm.get_computed_blocks(make_seq(range(9))) == ([], 0)
    assert bm.get_computed_blocks(make_seq(range(9), cache_salt="a")) == ([0, 1], 8)
    unsalted = make_seq(range(9))
    admit(bm, unsalted)
    assert unsalted.block_table == [2, 3, 4]
    assert bm.get_computed_blocks(make_seq(range(9))) == ([2, 3], 8)


def test_prefix_caching_off_never_hits_and_keeps_allocation_order():
    bm = BlockManager(6, block_size=4, enable_prefix_caching=False)
    a, b = make_seq(range(9)), make_seq(range(9))
    assert admit(bm, a) == ([], 0)
    assert admit(bm, b) == ([], 0)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3, 4, 5])
    assert bm.cached_blocks == {} and bm.block_hashes == [None] * 6
    assert a.block_hashes == [] and b.block_hashes == []
    bm.free(a)
    bm.free(b)
    assert list(bm.free_queue) == [2, 1, 0, 5, 4, 3]
    c = make_seq(range(9))
    assert admit(bm, c) == ([], 0)
    assert c.block_table == [2, 1, 0]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)


def test_reset_prefix_cache_only_when_idle():
    bm = BlockManager(4, block_size=4)
    a = make_seq(range(8))
    admit(bm, a)
    assert not bm.reset_prefix_cache()
    assert len(bm.cached_blocks) == 2
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.cached_blocks == {} and bm.block_hashes == [None] * 4
    assert bm.get_computed_blocks(make_seq(range(9))) == ([], 0)


def test_invalid_use_is_rejected():
    bm = BlockManager(4, block_size=4)
    seq = make_seq(range(5))
    with pytest.raises(ValueError):
        bm.allocate_slots(seq, -1)
    admit(bm, seq)
    bm.free(seq)
    bm.free(seq)  # idempotent
    assert bm.num_free_blocks == 4
    forged = make_seq(range(5))
    forged.block_table = [0, 1]
    with pytest.raises(ValueError):
        bm.free(forged)
    assert bm.num_free_blocks == 4 and bm.ref_counts == [0, 0, 0, 0]
    other = make_seq(range(9))
    admit(bm, other)
    with pytest.raises(ValueError):  # hits must start an empty table
        bm.allocate_slots(other, 1, [0])
    with pytest.raises(ValueError):
        BlockManager(0)


# --- property test: a small scheduler loop over a tiny pool --------------------------------------------

BLOCK_SIZE = 4
NUM_BLOCKS = 8
BASE_PROMPTS = [[0] * 20, [1, 0] * 10, [0, 1, 1, 0, 1] * 4]

# A cut of a shared base prompt plus a random tail, so prefixes (and whole prompts) repeat often.
prompts = st.builds(
    lambda base, cut, tail: (BASE_PROMPTS[base][:cut] + tail) or [1],
    st.integers(0, 2),
    st.integers(0, 20),
    st.lists(st.integers(0, 1), max_size=6),
)
ops = st.one_of(
    st.tuples(st.just("add"), prompts, st.sampled_from([None, "s"]), st.integers(1, 12)),
    st.tuples(st.just("step"), st.integers(0, 7), st.integers(1, 6)),
    st.tuples(st.just("readmit"), st.integers(0, 7), st.integers(1, 12)),
    st.tuples(st.sampled_from(["finish", "abort"]), st.integers(0, 7)),
)


def check_invariants(bm: BlockManager, running: list[Sequence], kv: dict) -> None:
    refs = [0] * bm.num_blocks
    for seq in running:
        assert len(set(seq.block_table)) == len(seq.block_table)
        assert len(seq.block_table) == -(-seq.num_computed_tokens // BLOCK_SIZE)
        for block_id in seq.block_table:
            refs[block_id] += 1
        for pos in range(seq.num_computed_tokens):  # every computed slot holds this sequence's K/V
            assert kv[seq.block_table[pos // BLOCK_SIZE], pos % BLOCK_SIZE] == (
                seq.cache_salt,
                tuple(seq.token_ids[: pos + 1]),
            )
    assert refs == bm.ref_counts
    assert sum(bm.ref_counts) == sum(len(seq.block_table) for seq in running)
    assert sorted(bm.free_queue) == [b for b in range(bm.num_blocks) if refs[b] == 0]
    for seq in running:
        for i, block_id in enumerate(seq.block_table):
            if refs[block_id] > 1:  # shared blocks are cached full blocks holding the same prefix
                assert bm.block_hashes[block_id] == seq.block_hashes[i]
                assert bm.cached_blocks[seq.block_hashes[i]] == block_id
    assert {h: b for b, h in enumerate(bm.block_hashes) if h is not None} == bm.cached_blocks
    assert bm.usage == pytest.approx(1 - bm.num_free_blocks / bm.num_blocks)


def schedule(bm: BlockManager, seq: Sequence, num_new: int, kv: dict, hits=None) -> bool:
    before = snapshot(bm, seq)
    num_hit_tokens = len(hits or []) * BLOCK_SIZE
    if not bm.allocate_slots(seq, num_new, hits):
        assert snapshot(bm, seq) == before
        return False
    start = seq.num_computed_tokens + num_hit_tokens
    for pos in range(start, start + num_new):  # the model writes the new tokens' K/V
        block_id = seq.block_table[pos // BLOCK_SIZE]
        assert bm.ref_counts[block_id] == 1, "writing into a shared block"
        kv[block_id, pos % BLOCK_SIZE] = (seq.cache_salt, tuple(seq.token_ids[: pos + 1]))
    seq.num_computed_tokens = start + num_new
    return True


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(ops, min_size=5, max_size=50))
def test_random_scheduling_keeps_block_accounting_consistent(enable_prefix_caching, operations):
    bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching)
    running: list[Sequence] = []
    waiting: list[Sequence] = []
    kv: dict = {}

    def admit_chunk(seq: Sequence, chunk: int) -> None:
        hits, num_hit_tokens = bm.get_computed_blocks(seq)
        assert num_hit_tokens < seq.num_tokens and num_hit_tokens % BLOCK_SIZE == 0
        if not enable_prefix_caching:
            assert hits == []
        num_new = min(chunk, seq.num_tokens - num_hit_tokens)
        if schedule(bm, seq, num_new, kv, hits):
            running.append(seq)
        else:
            waiting.append(seq)

    for op in operations:
        if op[0] == "add":
            _, prompt, salt, chunk = op
            admit_chunk(make_seq(prompt, cache_salt=salt), chunk)
        elif op[0] == "readmit" and waiting:
            admit_chunk(waiting.pop(op[1] % len(waiting)), op[2])
        elif op[0] == "step" and running:
            seq = running[op[1] % len(running)]
            if seq.num_computed_tokens < seq.num_tokens:  # still prefilling: next chunk
                num_new = min(op[2], seq.num_tokens - seq.num_computed_tokens)
            else:  # decoding: k new tokens (as with speculative decoding)
                for _ in range(op[2]):
                    seq.append_token(len(seq.token_ids) % 2)
                num_new = op[2]
            if not schedule(bm, seq, num_new, kv):  # preempt by recompute
                running.remove(seq)
                bm.free(seq)
                waiting.insert(0, seq)
        elif op[0] in ("finish", "abort") and running:
            seq = running.pop(op[1] % len(running))
            bm.free(seq)
            bm.free(seq)
        check_invariants(bm, running, kv)

    for seq in running + waiting:
        bm.free(seq)
    assert bm.num_free_blocks == NUM_BLOCKS and bm.usage == 0.0
    assert bm.ref_counts == [0] * NUM_BLOCKS
