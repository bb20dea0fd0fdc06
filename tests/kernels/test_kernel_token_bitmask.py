"""The Triton token-bitmask kernel equals its torch reference, and both equal xgrammar's own
apply_token_bitmask_inplace (the grammar engine whose bitmasks they read).

Without CUDA the kernel runs in the Triton interpreter on CPU tensors; with CUDA it compiles, and the
Llama-3 vocabulary shape at 64 rows runs too (``-s`` prints its timing).
"""

import pytest
import torch

from kernel_testing import DEVICE, for_device, needs_cuda
from pagetron.kernels import token_bitmask as kernel_module
from pagetron.kernels.token_bitmask_ref import apply_token_bitmask_ref

apply_token_bitmask = for_device(kernel_module).apply_token_bitmask


def random_case(rows: int, vocab: int, seed: int, extra_words: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen)
    words = torch.randint(-(2**31), 2**31 - 1, (rows, -(-vocab // 32) + extra_words), generator=gen)
    words = words.to(torch.int32)
    words[0, 0] = -(2**31)  # only bit 31: token 31 alone is allowed among the first 32
    return logits, words


def test_reference_reads_bit_j_of_word_w_as_token_32w_plus_j():
    logits = torch.zeros(2, 70)
    words = torch.zeros(2, 3, dtype=torch.int32)
    words[0, 0] = -(2**31)  # token 31
    words[0, 2] = 0b101  # tokens 64 and 66
    words[1] = -1  # everything
    apply_token_bitmask_ref(logits, words, None)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [31, 64, 66]
    assert torch.isfinite(logits[1]).all()


@pytest.mark.parametrize("vocab", [100, 4096, 4096 + 37, 49152])
def test_every_row_matches_reference_and_xgrammar(vocab):
    import xgrammar

    logits, words = random_case(5, vocab, seed=vocab)
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, words)
    reference = logits.clone()
    apply_token_bitmask_ref(reference, words, None)
    assert torch.equal(reference, expected)
    out = logits.to(DEVICE)
    apply_token_bitmask(out, words.to(DEVICE), None)
    assert torch.equal(out.cpu(), expected)


def test_some_rows_with_wider_words_match_xgrammar():
    """Rows 3, 0 and 5 of 6 are constrained (in that order); the bitmask rows have spare words."""
    import xgrammar

    logits, words = random_case(3, 4096 + 100, seed=1, extra_words=2)
    rows = [3, 0, 5]
    logits = torch.randn(6, 4096 + 100, generator=torch.Generator().manual_seed(2))
    full = torch.full((6, words.shape[1]), -1, dtype=torch.int32)
    full[rows] = words
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, full)
    reference = logits.clone()
    apply_token_bitmask_ref(reference, words, torch.tensor(rows))
    assert torch.equal(reference, expected)
    out = logits.to(DEVICE)
    apply_token_bitmask(out, words.to(DEVICE), torch.tensor(rows, dtype=torch.int32, device=DEVICE))
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(out.cpu()[[1, 2, 4]], logits[[1, 2, 4]])  # unconstrained rows untouched


def test_words_short_of_the_vocabulary_forbid_the_tokens_past_them():
    """A grammar over a tokenizer of 4,096 + 37 tokens on a model padded to 4,096 + 200: 130 words; the
    63 tokens past them are -inf on every constrained row, the unconstrained row is untouched."""
    logits, words = random_case(2, 4096 + 37, seed=4)
    logits = torch.randn(3, 4096 + 200, generator=torch.Generator().manual_seed(5))
    assert words.shape[1] == 130
    reference = logits.clone()
    apply_token_bitmask_ref(reference, words, torch.tensor([2, 0]))
    assert torch.isinf(reference[[0, 2], 130 * 32 :]).all() and torch.equal(reference[1], logits[1])
    padded = torch.cat([words, torch.zeros(2, 7, dtype=torch.int32)], dim=1)  # the same as zero words
    wide = logits.clone()
    apply_token_bitmask_ref(wide, padded, torch.tensor([2, 0]))
    assert torch.equal(reference, wide)
    out = logits.to(DEVICE)
    apply_token_bitmask(out, words.to(DEVICE), torch.tensor([2, 0], dtype=torch.int32, device=DEVICE))
    assert torch.equal(out.cpu(), reference)


@needs_cuda
def test_cuda_llama3_vocab_64_rows():
    import triton.testing

    logits, words = random_case(64, 128256, seed=3)
    logits, words = logits.to(DEVICE), words.to(DEVICE)
    expected = logits.clone()
    apply_token_bitmask_ref(expected, words, None)
    out = logits.clone()
    apply_token_bitmask(out, words, None)
    assert torch.equal(out, expected)
    kernel_ms = triton.testing.do_bench(lambda: apply_token_bitmask(logits.clone(), words, None))
    ref_ms = triton.testing.do_bench(lambda: apply_token_bitmask_ref(logits.clone(), words, None))
    print(f"\ntoken bitmask [64, 128256] (with a clone): triton {kernel_ms:.3f} ms, torch {ref_ms:.3f} ms")


def test_the_samplers_path_matches_reference():
    """Through Sampler's BitmaskUpload with the triton kernel set (interpreted on the CPU): on CUDA the
    pinned staging buffer (which grows once); some rows or every row constrained."""
    from pagetron.backend.core.step import GrammarMask
    from pagetron.backend.model.sampler import BitmaskUpload

    def filled_with(words):
        def fill(_states, out):
            out[...] = words.numpy()

        return fill

    upload = BitmaskUpload("triton")
    for seed, (num_rows, rows) in enumerate([(4, [0, 1, 2, 3]), (200, list(range(0, 200, 2))), (3, [1])]):
        _, words = random_case(len(rows), 1000, seed=seed)
        logits = torch.randn(num_rows, 1000, generator=torch.Generator().manual_seed(seed))
        mask = GrammarMask(rows, [None] * len(rows), words.shape[1], filled_with(words))
        expected = logits.clone()
        apply_token_bitmask_ref(expected, words, None if len(rows) == num_rows else torch.tensor(rows))
        out = logits.to(DEVICE)
        upload.apply(out, mask)
        assert torch.equal(out.cpu(), expected), seed
