"""`pagetron bench structured` runs end to end on a tiny model and reports both modes at each concurrency."""

from __future__ import annotations

import json

from model_factory import make_hf_model
from pagetron.backend.cli import main


def test_the_structured_benchmark_reports_both_modes(tmp_path):
    model = make_hf_model(tmp_path / "m", "llama", num_kv_heads=2, tie_word_embeddings=True, vocab_size=49152,
                          with_tokenizer=True)  # fmt: skip
    out = tmp_path / "structured.json"
    code = main(["bench", "structured", "--model", str(model), "--concurrency", "1,4", "--requests", "4",
                 "--max-tokens", "8", "--kv-cache-memory-gb", "0.02", "--json", str(out)])  # fmt: skip
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["concurrency"] for r in runs] == [1, 4]
    for run in runs:
        # 8 tokens cannot complete the order schema: both modes generate 4 x 8 tokens
        assert run["unconstrained"]["output_tokens"] == run["json_schema"]["output_tokens"] == 32
        assert run["json_schema"]["ended_by_grammar"] == 0 and run["json_schema"]["mask_ms_per_step"] > 0
        # stepping synchronously (the CPU), the step waits for all of each fill
        constrained = run["json_schema"]
        assert constrained["mask_wait_ms_per_step"] >= constrained["mask_ms_per_step"]
        assert run["unconstrained"]["mask_ms_per_step"] is None and run["ratio"] > 0
        for mode in ("unconstrained", "json_schema"):
            host = run[mode]["host_ms_per_step"]
            # stepping synchronously: every step schedules, executes, updates and makes outputs
            assert run[mode]["engine_steps"] >= 8 and host["launch"] == host["sample"] == host["result"] == 0
            assert all(host[phase] > 0 for phase in ("schedule", "execute", "update", "outputs"))


def test_stepping_ahead_with_the_fill_on_a_thread(tmp_path):
    """--fill-on-thread on with asynchronous scheduling (what a GPU host with cores to spare does): each
    constrained step's masks are filled on a thread while the engine thread goes on, with the same tokens."""
    model = make_hf_model(tmp_path / "m", "llama", num_kv_heads=2, tie_word_embeddings=True, vocab_size=49152,
                          with_tokenizer=True)  # fmt: skip
    out = tmp_path / "structured.json"
    code = main(["bench", "structured", "--model", str(model), "--concurrency", "4", "--requests", "4",
                 "--max-tokens", "8", "--kv-cache-memory-gb", "0.02", "--async-scheduling",
                 "--fill-on-thread", "on", "--json", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["fill_masks_on_thread"] is True
    (run,) = result["runs"]
    constrained = run["json_schema"]
    assert run["unconstrained"]["output_tokens"] == constrained["output_tokens"] == 32
    # one prefill step (its masks filled where it samples), 7 decode steps that ran ahead of their
    # predecessor's tokens (filled on the thread), and the step() that only took the last result
    assert constrained["engine_steps"] == 9 and constrained["mask_fills_on_thread"] == 7
    assert run["unconstrained"]["mask_fills_on_thread"] == 0
    host = constrained["host_ms_per_step"]
    assert host["execute"] == 0 and all(host[phase] > 0 for phase in ("launch", "sample", "result"))
