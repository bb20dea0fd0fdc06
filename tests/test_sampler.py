import math
from collections import Counter

import pytest
import torch

from pagetron.backend.core.sampling_params import SamplingParams
from pagetron.backend.core.sequence import Sequence
from pagetron.backend.model.sampler import Sampler, _apply_penalties

EOS = 4


def make_seq(params: SamplingParams, prompt=(0,), outputs=(), index=0) -> Sequence:
    seq = Sequence(list(prompt), params, index=index)
    for token_id in outputs:
        seq.append_token(token_id)
    return seq


def crafted_logits(vocab_size=8):
    """A known distribution, scattered over a permuted vocab so that order-dependent bugs show up."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])  # the k-th most likely token is perm[k]
    logits = torch.empty(vocab_size)
    logits[perm] = probs.log()
    return logits, perm.tolist()


def draw(params: SamplingParams, logits: torch.Tensor, num: int = 2000, seed: int = 0) -> list[int]:
    seqs = [make_seq(params) for _ in range(num)]
    return Sampler([EOS], seed=seed)(logits.expand(num, -1), seqs).token_ids


# ---- greedy


def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    out = Sampler([EOS])(logits, [make_seq(SamplingParams(temperature=0)) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0),
    ] * 2
    out = Sampler([EOS])(logits, [make_seq(p) for p in params[:4]])
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[2] == logits[2].argmax().item()


def test_input_logits_are_not_modified_and_bf16_is_accepted():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0, 9.0]])
    before = logits.clone()
    params = SamplingParams(temperature=0, repetition_penalty=2.0, min_tokens=1)
    assert Sampler([EOS])(logits, [make_seq(params, prompt=[4])]).token_ids == [2]
    assert torch.equal(logits, before)
    assert Sampler([EOS])(logits.bfloat16(), [make_seq(SamplingParams(temperature=0))]).token_ids == [4]


# ---- seeds


def reference_seeded_draws(logits: torch.Tensor, seed: int, steps: int) -> list[int]:
    """What a seeded row must produce: its own generator's Exp(1) noise in the exponential race."""
    gen = torch.Generator().manual_seed(seed)
    probs = logits.softmax(-1)
    return [
        (probs / torch.empty(len(logits)).exponential_(generator=gen)).argmax().item() for _ in range(steps)
    ]


def run_steps(
    sampler: Sampler, rows: list[torch.Tensor], seqs: list[Sequence], steps: int
) -> list[list[int]]:
    tokens = [[] for _ in seqs]
    for _ in range(steps):
        out = sampler(torch.stack(rows), seqs)
        for i, token_id in enumerate(out.token_ids):
            tokens[i].append(token_id)
    return tokens


def test_seeded_row_repeats_regardless_of_batch_companions():
    target = torch.randn(100, generator=torch.Generator().manual_seed(3)) * 0.1  # near-uniform: varied draws
    expected = reference_seeded_draws(target, seed=1234, steps=10)
    assert len(set(expected)) > 5

    alone = run_steps(Sampler([EOS], seed=0), [target], [make_seq(SamplingParams(seed=1234))], 10)
    companions = [torch.randn(100), target, torch.randn(100), torch.randn(100)]
    companion_params = [
        SamplingParams(temperature=0.5),
        SamplingParams(seed=1234),
        SamplingParams(seed=99, top_k=5),
        SamplingParams(temperature=0),
    ]
    in_batch = run_steps(Sampler([EOS], seed=77), companions, [make_seq(p) for p in companion_params], 10)
    assert alone[0] == expected
    assert in_batch[1] == expected


def test_seed_uses_sequence_index():
    """The i-th of a request's n sequences is seeded with seed + i, so they differ but each repeats."""
    logits = torch.zeros(1000)
    seqs = [make_seq(SamplingParams(seed=10, n=2), index=i) for i in range(2)]
    tokens = run_steps(Sampler([EOS]), [logits, logits], seqs, 5)
    assert tokens[0] == reference_seeded_draws(logits, 10, 5)
    assert tokens[1] == reference_seeded_draws(logits, 11, 5)
    assert tokens[0] != tokens[1]


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.zeros(8, 1000)
    first = Sampler([EOS], seed=5)(logits, [make_seq(SamplingParams()) for _ in range(8)]).token_ids
    again = Sampler([EOS], seed=5)(logits, [make_seq(SamplingParams()) for _ in range(8)]).token_ids
    other = Sampler([EOS], seed=6)(logits, [make_seq(SamplingParams()) for _ in range(8)]).token_ids
    assert first == again
    assert first != other


# ---- support of top-k / top-p / min-p (2000 draws each, assert the support exactly)


@pytest.mark.parametrize(
    ("params", "support_size"),
    [
        (SamplingParams(), 8),
        (SamplingParams(top_k=1), 1),
        (SamplingParams(top_k=3), 3),
        (SamplingParams(top_k=0), 8),
        (SamplingParams(top_k=100), 8),
        (SamplingParams(top_p=0.39), 1),  # mass before each token: 0, .40, .65, .80, .90, .95, .98, .995
        (SamplingParams(top_p=0.6), 2),
        (SamplingParams(top_p=0.7), 3),
        (SamplingParams(top_p=0.85), 4),
        (SamplingParams(min_p=0.3), 3),  # threshold 0.12
        (SamplingParams(min_p=0.5), 2),  # threshold 0.20
        (SamplingParams(min_p=0.05), 6),  # threshold 0.02
        (SamplingParams(top_k=4, top_p=0.75), 3),  # renormalised top-4: .444, .278, .167, .111
        (SamplingParams(top_k=6, min_p=0.2), 4),  # threshold 0.08
        (SamplingParams(top_p=0.7, temperature=0.5), 2),  # probs ~ p^2: .618, .242, .087, ...
        (SamplingParams(top_p=0.9, temperature=3.0), 7),  # mass before the 8th: .95
    ],
)
def test_sampling_support_is_exact(params, support_size):
    logits, ranked_tokens = crafted_logits()
    samples = draw(params, logits)
    assert set(samples) == set(ranked_tokens[:support_size])


def test_rows_with_different_filters_in_one_batch():
    logits, ranked = crafted_logits()
    params = [
        SamplingParams(top_k=2),
        SamplingParams(),
        SamplingParams(top_p=0.39),
        SamplingParams(min_p=0.5),
    ]
    seqs = [make_seq(params[i % 4]) for i in range(2000)]
    tokens = Sampler([EOS])(logits.expand(2000, -1), seqs).token_ids
    assert {tokens[i] for i in range(0, 2000, 4)} == set(ranked[:2])
    assert {tokens[i] for i in range(1, 2000, 4)} == set(ranked)
    assert {tokens[i] for i in range(2, 2000, 4)} == {ranked[0]}
    assert {tokens[i] for i in range(3, 2000, 4)} == set(ranked[:2])


def test_masked_logits_are_never_sampled():
    logits = torch.full((2000, 6), float("-inf"))
    logits[:, [1, 4]] = 0.0
    assert set(draw(SamplingParams(temperature=1.5), logits[0])) == {1, 4}


# ---- temperature frequencies


def chi_square(samples: list[int], probs: torch.Tensor) -> float:
    counts = Counter(samples)
    expected = probs * len(samples)
    return sum((counts.get(i, 0) - e) ** 2 / e for i, e in enumerate(expected.tolist()))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    logits = torch.tensor([0.0, 0.5, 1.0, 1.5, -1.0])
    samples = draw(SamplingParams(temperature=temperature), logits, num=4000, seed=1)
    probs = (logits / temperature).softmax(-1)
    # df = 4; 25 is far in the tail (p < 1e-4), while a wrong temperature gives a statistic in the hundreds
    assert chi_square(samples, probs) < 25
    wrong = (logits / (temperature * 2)).softmax(-1)
    assert chi_square(samples, wrong) > 50


# ---- penalties


def test_penalties_match_hand_computation():
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -0.5, 0.0], [1.0, -1.0, 2.0, 0.5, -0.5, 0.0]])
    penalized = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    seqs = [
        make_seq(penalized, prompt=[0, 1], outputs=[2, 2, 3]),
        make_seq(SamplingParams(), prompt=[5, 5, 5, 5, 5], outputs=[1]),  # no penalties: untouched
    ]
    _apply_penalties(logits, seqs)
    # repetition on prompt+output {0,1,2,3}: 1/2, -1*2, 2/2, 0.5/2; then output counts {2: 2, 3: 1}:
    # token 2: 1.0 - 0.5*2 - 0.25 = -0.25; token 3: 0.25 - 0.5*1 - 0.25 = -0.5
    assert logits[0].tolist() == [0.5, -2.0, -0.25, -0.5, -0.5, 0.0]
    assert logits[1].tolist() == [1.0, -1.0, 2.0, 0.5, -0.5, 0.0]


def test_negative_frequency_and_presence_penalties_reward_repeats():
    logits = torch.zeros(1, 5)
    params = SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5, repetition_penalty=1.0)
    _apply_penalties(logits, [make_seq(params, prompt=[0], outputs=[3, 3, 1])])
    assert logits[0].tolist() == [0.0, 1.5, 0.0, 2.5, 0.0]  # the prompt token 0 is not an output token


def test_penalties_change_the_greedy_choice_but_not_the_raw_logprobs():
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -0.5, 0.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, logprobs=1)
    out = Sampler([EOS])(logits, [make_seq(params, prompt=[0, 1], outputs=[2, 2, 3])])
    assert out.token_ids == [0]  # penalised logits: [0.5, -2, -0.25, -0.5, -0.5, 0]
    raw = torch.log_softmax(logits[0], -1)
    assert out.sampled_logprobs == [raw[0].item()]
    assert out.logprobs == [{2: (raw[2].item(), 1), 0: (raw[0].item(), 2)}]


# ---- min_tokens


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 10.0]] * 4)  # EOS (4) then stop id 3 are the most likely
    sampler = Sampler([EOS])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    seqs = [
        make_seq(params, outputs=[]),
        make_seq(params, outputs=[1]),
        make_seq(params, outputs=[1, 1]),  # min_tokens reached: nothing masked
        make_seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3], ignore_eos=True)),
    ]
    assert sampler(logits, seqs).token_ids == [2, 2, 4, 4]


def test_min_tokens_with_sampling_never_draws_stop_ids():
    logits = torch.zeros(6)
    params = SamplingParams(min_tokens=1, stop_token_ids=[0, 1])
    assert set(draw(params, logits, num=500)) == {2, 3, 5}


def test_multiple_eos_ids():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]])
    params = SamplingParams(temperature=0, min_tokens=1)
    assert Sampler({0, 1})(logits, [make_seq(params)]).token_ids == [2]


# ---- logprobs


def test_logprobs_values_ranks_and_sampled_token():
    logits = torch.tensor([[2.0, 0.5, 3.0, -1.0, 1.0, 0.0]])
    raw = torch.log_softmax(logits[0], -1).tolist()
    # force sampling token 4 (rank 3) by masking the two best via min_tokens
    params = SamplingParams(temperature=0, logprobs=2, min_tokens=1, stop_token_ids=[2, 0])
    out = Sampler([EOS])(logits, [make_seq(params)])
    assert out.token_ids == [1]  # EOS (4) is masked too; token 1 is the best remaining
    assert out.sampled_logprobs == [raw[1]]
    assert out.logprobs == [{2: (raw[2], 1), 0: (raw[0], 2), 1: (raw[1], 4)}]


@pytest.mark.parametrize(("n", "expected_keys"), [(None, None), (0, [2]), (1, [2]), (3, [2, 0, 4])])
def test_logprobs_count(n, expected_keys):
    logits = torch.tensor([[2.0, 0.5, 3.0, -1.0, 1.0, 0.0]])
    out = Sampler([EOS])(logits, [make_seq(SamplingParams(temperature=0, logprobs=n))])
    if expected_keys is None:
        assert out.logprobs == [None]
    else:
        assert list(out.logprobs[0]) == expected_keys
        assert [rank for _, rank in out.logprobs[0].values()] == list(range(1, len(expected_keys) + 1))


def test_logprobs_per_row_in_a_batch():
    logits = torch.tensor([[2.0, 0.5, 3.0, -1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0, 0.0, 1.0]])
    params = [SamplingParams(temperature=0, logprobs=1), SamplingParams(temperature=0, logprobs=20)]
    out = Sampler([EOS])(logits, [make_seq(p) for p in params])
    assert list(out.logprobs[0]) == [2]
    assert len(out.logprobs[1]) == 6  # top-20 capped at the vocab size
    assert out.logprobs[1][3][1] == 1 and out.logprobs[1][5][1] == 2
    assert math.isclose(sum(math.exp(lp) for lp, _ in out.logprobs[1].values()), 1.0, rel_tol=1e-6)


def test_sampled_logprobs_are_raw_even_with_temperature():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    seqs = [make_seq(SamplingParams(temperature=0.3, top_k=2)) for _ in range(50)]
    out = Sampler([EOS])(logits.expand(50, -1), seqs)
    raw = torch.log_softmax(logits, -1).tolist()
    assert out.sampled_logprobs == [raw[t] for t in out.token_ids]
    assert set(out.token_ids) == {2, 3}


# ---- CUDA (skipped on CPU-only machines): the same engine code with CPU request generators


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_seeded_rows_support_and_greedy():
    target = (torch.randn(5000, generator=torch.Generator().manual_seed(3)) * 0.1).cuda()
    alone = run_steps(Sampler([EOS]), [target], [make_seq(SamplingParams(seed=1234))], 10)
    rows = [torch.randn(5000, device="cuda"), target, torch.randn(5000, device="cuda")]
    params = [SamplingParams(seed=5), SamplingParams(seed=1234), SamplingParams(temperature=0)]
    in_batch = run_steps(Sampler([EOS], seed=9), rows, [make_seq(p) for p in params], 10)
    assert in_batch[1] == alone[0] and len(set(alone[0])) > 5
    assert set(in_batch[2]) == {rows[2].argmax().item()}

    logits, ranked = crafted_logits()
    assert set(draw(SamplingParams(top_p=0.6), logits.cuda())) == set(ranked[:2])
    seeded = [make_seq(SamplingParams(top_k=3, seed=1), index=i) for i in range(2000)]  # seeds 1..2000
    assert set(Sampler([EOS])(logits.cuda().expand(2000, -1), seeded).token_ids) == set(ranked[:3])
