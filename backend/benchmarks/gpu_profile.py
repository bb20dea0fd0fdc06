"""Where a workload-T run spends its time on a GPU: per-step host and device time by step kind, a kernel
table (torch.profiler) for one prefill-heavy and one decode-only window, and the GEMM rates of the shape.

  python -m pagetron.backend.benchmarks.gpu_profile --shape llama2-13b [--requests 512] [--json out.json]

Timing synchronizes the device around each phase of the model runner (prepare inputs, forward, sample;
the step already waits for the sampled ids, so this moves little); the profiled windows are excluded from
the step statistics. It hooks in through the engine's executor factory, not by patching the engine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from pagetron.backend.benchmarks.gpu_workloads import SHAPES, params_count, workload_t, write_config
from pagetron.backend.benchmarks.roofline import ModelShape, Request, engine_floor, measure_ceilings
from pagetron.backend.core.step import RunnerOutput, SchedulerOutput
from pagetron.backend.executor.executor import ExecutorWrapper, UniprocExecutor
from pagetron.backend.executor.model_runner import PhaseTimes

PROFILED_STEPS = {"prefill": (2, 4), "decode": (400, 402)}  # [first, last) engine steps of each window
MIXED_PROFILE_AFTER = 300  # the first mixed step after this many steps is profiled too


def _profiler() -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    return torch.profiler.profile(activities=activities)


def _kernel_table(prof: torch.profiler.profile) -> str:
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)


class ProfilingExecutor(ExecutorWrapper):
    """Wraps the engine's executor (the seam the engine offers): times each step's phases with the model
    runner's PhaseTimes (device synchronized around each) and profiles the kernel windows."""

    def __init__(self, inner: UniprocExecutor):
        super().__init__(inner)
        self.times = PhaseTimes(sync=True)
        inner.worker.runner.phase_times = self.times
        self.active = False  # set once warm-up is over
        self.rows: list[dict] = []
        self.tables: dict[str, str] = {}
        self._profiler = None

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        if not self.active:
            return super().execute(scheduler_output)
        index = len(self.rows)
        for name, (first, last) in PROFILED_STEPS.items():
            if index == first:
                self._profiler = _profiler()
                self._profiler.__enter__()
            if index == last and self._profiler is not None:
                self._profiler.__exit__(None, None, None)
                self.tables[name] = _kernel_table(self._profiler)
                self._profiler = None
        decodes = scheduler_output.num_decodes
        row = {
            "index": index,
            # the step that closes a window pays for the profiler's teardown and table: excluded too
            "profiled": any(f <= index <= la for f, la in PROFILED_STEPS.values()),
            "decode_seqs": decodes,
            "prefill_tokens": scheduler_output.num_tokens - decodes,
        }
        # one mixed step (decodes and prefill chunks together) late in the run, profiled on its own
        late_mixed = index >= MIXED_PROFILE_AFTER and decodes and row["prefill_tokens"]
        num_timed = len(self.times.steps)
        start = time.perf_counter()
        if late_mixed and "mixed" not in self.tables and self._profiler is None:
            row["profiled"] = True
            with _profiler() as prof:
                out = super().execute(scheduler_output)
            self.tables["mixed"] = _kernel_table(prof)
        else:
            out = super().execute(scheduler_output)
        row["run_s"] = time.perf_counter() - start
        phases = self.times.steps[-1] if len(self.times.steps) > num_timed else {}
        for phase in ("prepare", "forward", "sample"):
            row[f"{phase}_s"] = phases.get(phase, 0.0)
        self.rows.append(row)
        return out


def summarize(rows: list[dict], flops_per_token: float) -> dict:
    groups: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        if r.get("profiled") or "run_s" not in r:
            continue
        kind = "mixed" if r["prefill_tokens"] else "decode"
        g = groups[kind]
        g["steps"] += 1
        for key in ("step_s", "run_s", "prepare_s", "forward_s", "sample_s"):
            g[key] += r.get(key, 0.0)
        g["decode_seqs"] += r["decode_seqs"]
        g["prefill_tokens"] += r["prefill_tokens"]
    out = {}
    for kind, g in groups.items():
        steps = g["steps"]
        engine = g["step_s"] - g["run_s"]  # schedule, update and outputs
        tokens = g["decode_seqs"] + g["prefill_tokens"]
        out[kind] = {
            "steps": int(steps),
            "total_s": round(g["step_s"], 2),
            "forward_s": round(g["forward_s"], 2),
            "ms_per_step": {
                "step": round(1e3 * g["step_s"] / steps, 2),
                "schedule_update_outputs": round(1e3 * engine / steps, 2),
                "prepare_inputs": round(1e3 * g["prepare_s"] / steps, 2),
                "forward": round(1e3 * g["forward_s"] / steps, 2),
                "sample": round(1e3 * g["sample_s"] / steps, 2),
            },
            "avg_decode_seqs": round(g["decode_seqs"] / steps, 1),
            "avg_prefill_tokens": round(g["prefill_tokens"] / steps, 1),
            "forward_tflops": round(tokens * flops_per_token / max(g["forward_s"], 1e-9) / 1e12, 1),
        }
    return out


def gemm_rates(shape: str, tokens: int = 8192) -> dict:
    s = SHAPES[shape]
    h, i = s["hidden_size"], s["intermediate_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    shapes = {"qkv": (h, h + 2 * kv), "o": (h, h), "gate_up": (h, 2 * i), "down": (i, h)}
    out = {}
    for name, (k, n) in shapes.items():
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            torch.nn.functional.linear(x, w)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / 20
        out[name] = round(2 * tokens * k * n / seconds / 1e12, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-13b")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--engine-args", default="{}", help="JSON merged over the benchmark's engine args")
    ns = parser.parse_args()

    from pagetron.backend import LLM, SamplingParams

    folder = write_config(ns.shape, Path(tempfile.mkdtemp()) / ns.shape)
    args = {"max_num_seqs": 256, "max_num_batched_tokens": 8192, **json.loads(ns.engine_args)}
    llm = LLM(
        str(folder),
        executor_factory=lambda spec: ProfilingExecutor(UniprocExecutor(spec)),
        load_format="dummy",
        **args,
    )
    recorder, engine = llm.engine.executor, llm.engine
    prompts = workload_t(SHAPES[ns.shape]["vocab_size"], requests=ns.requests)
    llm.generate(
        [{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False
    )
    recorder.active = True
    params = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    started = time.perf_counter()
    for p in prompts:
        engine.add_request({"prompt_token_ids": p}, params)
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        engine.step()
        if recorder.rows and "step_s" not in recorder.rows[-1]:
            recorder.rows[-1]["step_s"] = time.perf_counter() - step_start
    seconds = time.perf_counter() - started
    result = {
        "shape": ns.shape,
        "engine_args": args,
        "seconds": round(seconds, 2),
        "output_tok_s": round(ns.requests * ns.output_len / seconds, 1),
        "preemptions": llm.engine.scheduler.num_preemptions,
        "kv_blocks": llm.engine.block_manager.num_blocks,
        "steps": summarize(recorder.rows, 2 * params_count(ns.shape)),
    }
    if torch.cuda.is_available():
        result["gemm_tflops_at_8192_tokens"] = gemm_rates(ns.shape)
        ceilings = measure_ceilings()  # the engine's KV pool leaves 10% of the card: room for 2.4 GB
        requests = [Request(len(p), ns.output_len) for p in prompts]
        floor = engine_floor(ModelShape.from_hf_config(SHAPES[ns.shape]), requests, ceilings, args)
        result["roofline"] = floor.report(seconds, ceilings)
    for name, table in recorder.tables.items():
        print(f"--- kernels, {name} window ---\n{table}")
    print(json.dumps(result, indent=2))
    if ns.json_path:
        rows = [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in recorder.rows]
        full = {**result, "kernel_tables": recorder.tables, "step_rows": rows}
        Path(ns.json_path).write_text(json.dumps(full, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
