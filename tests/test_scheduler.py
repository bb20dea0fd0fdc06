"""Scheduler: exact batches, chunking, admission limits and preemption order (no model involved)."""

import pytest

from pagetron.backend.core.block_manager import BlockManager
from pagetron.backend.core.sampling_params import SamplingParams
from pagetron.backend.core.scheduler import Scheduler, SchedulerStuck
from pagetron.backend.core.sequence import Sequence, SequenceStatus
from pagetron.backend.core.step import RunnerOutput, SchedulerOutput

EOS = 2


def make_scheduler(
    num_blocks=16, block_size=4, max_num_seqs=8, budget=64, chunked=True, max_model_len=64, reserve=False
):
    """Without the growth reservation by default: these tests pin batching and preemption mechanics."""
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    return Scheduler(
        bm,
        max_num_seqs,
        budget,
        max_model_len,
        eos_token_ids=[EOS],
        enable_chunked_prefill=chunked,
        reserve_kv_for_growth=reserve,
    )


def seq(n_tokens, start=10, **params):
    return Sequence(list(range(start, start + n_tokens)), SamplingParams(**{"max_tokens": 50, **params}))


def sampled(token: int, rows: int) -> RunnerOutput:
    return RunnerOutput([token] * rows, [0.0] * rows, [None] * rows)


def step(sched, token=7):
    """One engine step with a fake executor that always samples ``token``."""
    batch = sched.schedule()
    updates = sched.update(batch, sampled(token, len(batch.sample_indices)))
    return batch, updates


def entries(batch: SchedulerOutput) -> list[tuple[Sequence, int]]:
    return list(zip(batch.seqs, batch.num_new_tokens))


def test_chunked_prefill_splits_a_long_prompt_over_steps():
    sched = make_scheduler(budget=8)
    a = seq(20)
    sched.add(a)
    sizes = []
    for _ in range(3):
        batch, updates = step(sched)
        sizes.append([(s.seq_id, n) for s, n in entries(batch)])
        assert [u.seq for u in updates] == ([a] if len(sizes) == 3 else [])
    assert sizes == [[(a.seq_id, 8)], [(a.seq_id, 8)], [(a.seq_id, 4)]]
    assert a.block_table == [0, 1, 2, 3, 4]
    assert a.output_token_ids == [7] and a.num_computed_tokens == 20


def test_running_first_then_waiting_within_the_token_budget():
    sched = make_scheduler(budget=10)
    a, b, c = seq(6), seq(6, start=40), seq(3, start=80)
    for s in (a, b, c):
        sched.add(s)
    batch, _ = step(sched)
    # a fits whole, b gets the remaining 4 tokens (chunked), c waits
    assert [(s, n) for s, n in entries(batch)] == [(a, 6), (b, 4)]
    batch, _ = step(sched)
    assert [(s, n) for s, n in entries(batch)] == [(a, 1), (b, 2), (c, 3)]
    assert [s.num_output_tokens for s in (a, b, c)] == [2, 1, 1]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(budget=10, chunked=False)
    a, b = seq(6), seq(6, start=40)
    sched.add(a)
    sched.add(b)
    batch, _ = step(sched)
    assert entries(batch) == [(a, 6)]
    batch, _ = step(sched)
    assert entries(batch) == [(a, 1), (b, 6)]


def test_max_num_seqs_caps_the_running_set():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [seq(3, start=10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch, _ = step(sched)
    assert [s for s, _ in entries(batch)] == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]


def test_preemption_takes_the_newest_and_requeues_it_first():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = seq(6), seq(6, start=40)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefilled: a -> [0, 1], b -> [2, 3]; 7 tokens each
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    step(sched)  # position 6 still in the second block
    batch, _ = step(sched)  # position 7
    assert batch.preempted == []
    batch, updates = step(sched)  # position 8 needs a third block: b is preempted, its blocks freed
    assert batch.preempted == [b]
    assert entries(batch) == [(a, 1)]
    assert a.block_table == [0, 1, 3]  # b freed [2, 3] in reverse order, so 3 came back first
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b] and sched.num_preemptions == 1
    assert b.num_output_tokens == 3  # its output is kept and recomputed, never lost
    assert [u.seq for u in updates] == [a]


def test_preempted_sequence_resumes_with_prompt_and_output_recomputed():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    a = seq(6, max_tokens=4)
    b = seq(6, start=40, max_tokens=8)
    sched.add(a)
    sched.add(b)
    for _ in range(4):
        step(sched)
    assert a.is_finished and a.finish_reason == "length" and a.block_table == []
    batch, _ = step(sched)  # b comes back: its first block is still cached, the other 5 tokens are recomputed
    assert entries(batch) == [(b, 5)]
    assert b.num_cached_tokens == 4 and b.block_table[0] == 2
    assert b.num_output_tokens == 4


def test_finish_reasons_eos_stop_token_min_tokens_and_max_model_len():
    sched = make_scheduler(max_model_len=9)
    a = seq(4, max_tokens=None)
    b = seq(4, start=30, stop_token_ids=[7])
    c = seq(4, start=50, min_tokens=2, stop_token_ids=[7])
    d = seq(4, start=70, ignore_eos=True)
    for s in (a, b, c, d):
        sched.add(s)
    _, updates = step(sched, token=7)
    assert [(u.seq, u.seq.is_finished) for u in updates] == [(a, False), (b, True), (c, False), (d, False)]
    assert (b.finish_reason, b.stop_reason) == ("stop", 7)
    _, updates = step(sched, token=EOS)
    assert [(u.seq, u.seq.is_finished) for u in updates] == [(a, True), (c, True), (d, False)]
    assert a.finish_reason == c.finish_reason == "stop"
    for _ in range(3):
        step(sched, token=EOS)
    assert d.finish_reason == "length" and d.num_tokens == 9  # max_model_len


def test_abort_frees_blocks_and_drops_late_samples():
    sched = make_scheduler()
    a = seq(5)
    sched.add(a)
    batch = sched.schedule()
    sched.abort([a])
    assert a.finish_reason == "abort" and sched.block_manager.num_free_blocks == 16
    updates = sched.update(batch, sampled(7, 1))
    assert updates == [] and a.output_token_ids == [] and not sched.has_unfinished()
    assert sched.schedule().finished_seq_ids == [a.seq_id]  # told to the executor once
    assert sched.schedule().finished_seq_ids == []


def test_rows_put_decodes_first_and_sample_only_chunks_that_reach_the_last_token():
    sched = make_scheduler(budget=12)
    a, b = seq(3), seq(20, start=40)
    sched.add(a)
    sched.add(b)
    batch, _ = step(sched)  # a whole (3), b's first chunk (9 of 20)
    assert entries(batch) == [(a, 3), (b, 9)] and batch.num_decodes == 0 and batch.sample_indices == [0]
    batch, _ = step(sched)  # a decodes one token, b continues with 11 of its remaining 11
    assert entries(batch) == [(a, 1), (b, 11)]
    assert batch.num_decodes == 1 and batch.sample_indices == [0, 1] and batch.num_tokens == 12
    assert a.output_token_ids == [7, 7] and b.output_token_ids == [7]


def test_a_one_token_chunk_is_laid_out_as_a_decode_row():
    sched = make_scheduler(budget=4)
    a, b = seq(3), seq(6, start=40)
    sched.add(a)
    sched.add(b)
    batch, _ = step(sched)  # a (3) and b's first token
    assert entries(batch) == [(b, 1), (a, 3)] and batch.num_decodes == 1 and batch.sample_indices == [1]


def test_a_request_larger_than_the_idle_cache_is_reported_not_spun_on():
    sched = make_scheduler(num_blocks=2, block_size=4)
    sched.add(seq(12))
    with pytest.raises(SchedulerStuck):
        sched.schedule()


def test_growth_reservation_holds_a_request_back_instead_of_preempting_later():
    # 6 blocks of 4; each request may grow to 4 + 12 = 16 tokens = 4 blocks, so two never fit at once
    for reserve in (True, False):
        sched = make_scheduler(num_blocks=6, block_size=4, reserve=reserve)
        a, b = seq(4, max_tokens=12), seq(4, start=40, max_tokens=12)
        sched.add(a)
        sched.add(b)
        batch, _ = step(sched)
        if reserve:
            # a is admitted into an idle engine; b would leave 4 free blocks for 3 + 3 of expected growth
            assert entries(batch) == [(a, 4)] and list(sched.waiting) == [b]
        else:
            assert entries(batch) == [(a, 4), (b, 4)]
        while sched.has_unfinished():
            step(sched)
        assert a.num_output_tokens == b.num_output_tokens == 12
        assert sched.num_preemptions == (0 if reserve else 1)


def test_growth_ratio_is_the_share_of_max_tokens_recent_finishes_used():
    sched = make_scheduler(num_blocks=64, reserve=True)
    assert sched.growth_ratio == 1.0  # nothing finished yet: reserve the whole allowance
    a, b, c = seq(4, max_tokens=8), seq(4, start=30, max_tokens=4), seq(4, start=50, max_tokens=8)
    for s in (a, b, c):
        sched.add(s)
    step(sched)  # one token each
    sched.abort([c])  # aborts say nothing about how long outputs run
    step(sched, token=EOS)  # a stops after 2 of 8 tokens, b after 2 of 4
    assert a.finish_reason == b.finish_reason == "stop"
    assert sched.growth_ratio == (2 / 8 + 2 / 4) / 2


def test_learned_growth_ratio_admits_more_when_requests_stop_early():
    sched = make_scheduler(num_blocks=8, block_size=4, reserve=True)
    first = seq(4, max_tokens=28)
    sched.add(first)
    step(sched, token=EOS)  # used 1 of its 28 tokens: the ratio drops to 1/28
    assert first.is_finished and sched.growth_ratio == 1 / 28
    a, b = seq(4, start=30, max_tokens=28), seq(4, start=60, max_tokens=28)
    sched.add(a)
    sched.add(b)
    batch, _ = step(sched)
    # each may grow to 32 tokens = 8 blocks, but at 1/28 each reserves ceil(7 / 28) = 1 block
    assert entries(batch) == [(a, 4), (b, 4)]
