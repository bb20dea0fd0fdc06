"""The GPU benchmark's workloads are the ones docs/benchmarks.md defines (fixed seeds, exact shapes)."""

from pagetron.backend.benchmarks.gpu_workloads import params_count, workload_p, workload_t


def test_workload_t_is_512_prompts_of_128_to_1024_tokens_and_repeats():
    prompts = workload_t(32000)
    assert len(prompts) == 512 and min(map(len, prompts)) >= 128 and max(map(len, prompts)) <= 1024
    assert prompts == workload_t(32000)
    assert all(3 <= t < 32000 for p in prompts[:8] for t in p)


def test_workload_p_shares_a_2048_token_system_prompt_plus_128_unique_tokens():
    prompts = workload_p(32000)
    assert len(prompts) == 256 and {len(p) for p in prompts} == {2176}
    assert all(p[:2048] == prompts[0][:2048] for p in prompts)
    assert len({tuple(p[2048:]) for p in prompts}) == 256


def test_parameter_counts_of_the_benchmark_shapes():
    assert round(params_count("llama2-13b") / 1e9, 2) == 13.02
    assert round(params_count("llama3-8b") / 1e9, 2) == 8.03
