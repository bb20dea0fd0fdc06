"""`pagetron bench lora` runs end to end on a tiny model and reports each setting against the base."""

from __future__ import annotations

import json

from model_factory import make_hf_model
from pagetron.backend.cli import main


def test_the_lora_benchmark_reports_every_setting(tmp_path):
    model = make_hf_model(tmp_path / "m", "llama", num_kv_heads=2, tie_word_embeddings=False)
    out = tmp_path / "lora.json"
    code = main(["bench", "lora", "--model", str(model), "--adapters", "2", "--requests", "6",
                 "--prompt-len", "8", "--max-tokens", "4", "--rank", "4", "--max-num-seqs", "6",
                 "--kv-cache-memory-gb", "0.01", "--profile", "--json", str(out)])  # fmt: skip
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["adapters"] for r in runs] == [0, 2] and runs[0]["of_base"] == 1.0
    assert all(r["output_tok_s"] > 0 and r["concurrency_1_ms_per_token"] > 0 for r in runs)
    assert runs[0]["concurrency_1_added_ms_per_token"] == 0.0
    base, lora = (r["profile"] for r in runs)
    assert base["requests"] == lora["requests"] == 6 and base["tokens"] == 8
    assert base["lora_ms"] == 0 and base["lora_launches"] == 0 and base["total_ms"] > 0
    # on the CPU the torch reference runs: no LoRA kernels, but its ops are in the table
    assert lora["lora_launches"] == 0 and any("matmul" in name or "mm" in name for name, _, _ in lora["top"])


def test_workload_t_prompts_and_warm_up_prompts_of_their_own(tmp_path):
    """--workload-t: workload T's prompt lengths (128-1024); the warm-up runs other prompts, so the timed
    batch finds none of its own in the prefix cache (its prompt tokens are all computed)."""
    model = make_hf_model(tmp_path / "m", "llama", num_kv_heads=2, tie_word_embeddings=False,
                          max_position_embeddings=2048)  # fmt: skip
    out = tmp_path / "t.json"
    code = main(["bench", "lora", "--model", str(model), "--adapters", "1", "--workload-t", "--requests", "3",
                 "--max-tokens", "2", "--rank", "4", "--max-num-seqs", "3", "--kv-cache-memory-gb", "0.05",
                 "--json", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["config"]["workload_t"] and result["config"]["requests"] == 3
    assert [r["adapters"] for r in result["runs"]] == [0, 1]
    for run in result["runs"]:
        assert 3 * 128 <= run["prompt_tokens"] <= 3 * 1024 and run["prompt_tokens_cached"] == 0


def test_the_floor_ratio_of_workload_t_on_the_8b_shape():
    """Rank-16 adapters on every projection of the Llama-3-8B shape (84 MB each) over workload T at 128
    sequences a step, at an H100's measured ceilings: 32 distinct adapters add 2.7 GB to each decode
    step's ~15 GB of weights and ~12 GB of K/V, and prefill is compute-bound, so the workload can keep
    0.939 of base at most; 0.891 at 32 sequences a step, where the K/V read is smaller."""
    from types import SimpleNamespace

    from pagetron.backend.benchmarks.gpu_workloads import workload_t
    from pagetron.backend.benchmarks.lora_bench import floor_ratio
    from pagetron.backend.benchmarks.roofline import Ceilings

    cfg = SimpleNamespace(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                          num_heads=32, num_kv_heads=8, head_dim=128)  # fmt: skip
    lens, h100 = [len(p) for p in workload_t(cfg.vocab_size)], Ceilings(735e12, 3.02e12)

    def ratios(max_num_seqs: int) -> list[float]:
        engine = {"max_num_seqs": max_num_seqs}
        return [floor_ratio(cfg, lens, 256, engine, n, 16, h100) for n in (0, 1, 8, 32)]

    assert ratios(128) == [1.0, 0.996, 0.983, 0.939]
    assert ratios(32) == [1.0, 0.995, 0.969, 0.891]
