"""What constrained decoding costs: the same chat workload unconstrained and under a realistic JSON schema
(an order with customer, address and line items), in one run on one engine, at each concurrency.

  pagetron bench structured [--model PATH | --shape llama3-8b] [--concurrency 1,64] [--requests 64]
      [--max-tokens 64] [--fill-on-thread auto|on|off] [--json out.json] [engine arguments]

``--shape`` runs a GPU benchmark shape with random weights (load_format dummy) and the bundled SmolLM2's
tokenizer (or ``--tokenizer FOLDER``: SmolLM2's, saved, where its package is not installed), whose 49,152
tokens are the only ones a grammar allows there (the rest are masked like special tokens); prompts and
outputs are still the same in both modes.

A closed loop keeps `concurrency` requests in flight (a new one starts as one finishes) until `requests`
have run. Every request is greedy. Unconstrained requests ignore EOS, so both modes run to max_tokens
unless the grammar completes first (the order schema needs more than 64 tokens, so at the default they
do not); throughput counts the tokens actually generated. The mask time is the host time filling
bitmasks, per step that had constrained rows (on a GPU it overlaps the step's forward pass; on the CPU it
adds to it), and the part of it the engine thread waited for (less than all where the fill ran on a
thread beside it: asynchronous scheduling on a host with cores to spare); the device applies them inside
the sampler. Each mode also reports the engine's host time per step by phase (``HostPhases``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "maxLength": 60},
                "tier": {"enum": ["free", "pro", "enterprise"]},
            },
            "required": ["name", "email", "tier"],
        },
        "shipping": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 60},
                "city": {"type": "string", "maxLength": 40},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "express": {"type": "boolean"},
            },
            "required": ["street", "city", "zip", "express"],
        },
        "items": {
            "type": "array",
            "minItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "unit_price": {"type": "number", "minimum": 0},
                },
                "required": ["sku", "quantity", "unit_price"],
            },
        },
        "notes": {"type": "string", "maxLength": 200},
    },
    "required": ["order_id", "customer", "shipping", "items"],
}
QUESTION = "Write a realistic online shop order as JSON: id, customer, shipping address and line items."


class HostPhases:
    """Host time per engine phase, for finding where a constrained step's time goes: the engine's
    scheduler, executor and output processor methods are wrapped in timers (on this engine only, by this
    benchmark). ``sample`` and ``result`` are the in-flight step's (asynchronous scheduling: sample waits
    for the mask fill, result for the device); ``execute`` is a synchronous step's whole forward pass."""

    PHASES = ("schedule", "launch", "sample", "result", "execute", "update", "outputs")

    def __init__(self, engine):
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0
        scheduler, executor = engine.scheduler, engine.executor
        scheduler.schedule = self._timed(scheduler.schedule, "schedule", count=True)
        scheduler.update = self._timed(scheduler.update, "update")
        engine.output_processor.process = self._timed(engine.output_processor.process, "outputs")
        executor.execute = self._timed(executor.execute, "execute")
        launch = self._timed(executor.launch, "launch")
        executor.launch = lambda out: _TimedStep(launch(out), self)

    def _timed(self, fn, phase: str, count: bool = False):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
                self.steps += count

        return timed

    def snapshot(self) -> tuple[int, dict[str, float]]:
        return self.steps, dict(self.seconds)

    def ms_per_step(self, since: tuple[int, dict[str, float]]) -> dict[str, float]:
        steps = max(1, self.steps - since[0])
        return {k: round(1e3 * (v - since[1][k]) / steps, 3) for k, v in self.seconds.items()}


class _TimedStep:
    def __init__(self, launched, phases: HostPhases):
        self.sample = phases._timed(launched.sample, "sample")
        self.result = phases._timed(launched.result, "result")


def closed_loop(llm, prompts: list[list[int]], params, concurrency: int) -> tuple[float, int, int]:
    """Runs every prompt, ``concurrency`` at a time; (seconds, output tokens, requests ended by stop)."""
    engine = llm.engine
    queue = list(prompts)
    in_flight, tokens, stopped = 0, 0, 0
    started = time.perf_counter()
    while queue or in_flight:
        while queue and in_flight < concurrency:
            engine.add_request({"prompt_token_ids": queue.pop()}, params)
            in_flight += 1
        for out in engine.step():
            if out.finished:
                in_flight -= 1
                tokens += len(out.outputs[0].token_ids)
                stopped += out.outputs[0].finish_reason == "stop"
    return time.perf_counter() - started, tokens, stopped


def run_structured_bench(ns: argparse.Namespace) -> int:
    from pagetron.backend import LLM, SamplingParams
    from pagetron.backend.cli import engine_args

    levels = [int(c) for c in ns.concurrency.split(",")]
    args = {"max_num_seqs": max(levels), **engine_args(ns)}
    if ns.shape:
        from pagetron.backend.benchmarks.gpu_workloads import write_config
        from pagetron.backend.model.loader.paths import default_model_path

        folder = write_config(ns.shape, Path(tempfile.mkdtemp(prefix="pagetron-structured-")))
        args.update(model=str(folder), load_format="dummy")
        if not args.get("tokenizer"):
            args["tokenizer"] = str(default_model_path())
    llm = LLM(**args)
    if ns.fill_on_thread != "auto":  # before the first constrained request, which sets the GIL interval
        llm.engine.fill_masks_on_thread = ns.fill_on_thread == "on"
    prompt = llm.encode_chat([{"role": "user", "content": QUESTION}])
    prompts = [list(prompt) for _ in range(ns.requests)]
    modes = {
        "unconstrained": SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True),
        "json_schema": SamplingParams(
            temperature=0, max_tokens=ns.max_tokens, structured_outputs={"json": ORDER_SCHEMA}
        ),
    }
    llm.generate([{"prompt_token_ids": prompt}], modes["json_schema"], use_tqdm=False)  # compile + warm-up
    scheduler = llm.engine.scheduler
    phases = HostPhases(llm.engine)
    config = {k: v for k, v in vars(ns).items() if k not in ("func", "json_path", "command", "workload")}
    result: dict = {
        "config": config,
        "device": llm.engine.executor.device_name,
        "fill_masks_on_thread": llm.engine.fill_masks_on_thread,
        "runs": [],
    }
    for concurrency in levels:
        row = {"concurrency": concurrency}
        for mode, params in modes.items():
            stats = scheduler.mask_stats
            steps, seconds, waited, on_thread = stats.steps, stats.seconds, stats.waited, stats.on_thread
            since = phases.snapshot()
            elapsed, tokens, stopped = closed_loop(llm, prompts, params, concurrency)
            mask_steps = stats.steps - steps
            row[mode] = {
                "seconds": round(elapsed, 3),
                "output_tok_s": round(tokens / elapsed, 1),
                "output_tokens": tokens,
                "ended_by_grammar": stopped if mode == "json_schema" else 0,
                "mask_ms_per_step": round(1e3 * (stats.seconds - seconds) / mask_steps, 4)
                if mask_steps
                else None,
                "mask_wait_ms_per_step": round(1e3 * (stats.waited - waited) / mask_steps, 4)
                if mask_steps
                else None,
                "mask_fills_on_thread": stats.on_thread - on_thread,
                "engine_steps": phases.steps - since[0],
                "host_ms_per_step": phases.ms_per_step(since),
            }
        row["ratio"] = round(row["json_schema"]["output_tok_s"] / row["unconstrained"]["output_tok_s"], 3)
        result["runs"].append(row)
        print(
            f"concurrency {concurrency:3d}: unconstrained {row['unconstrained']['output_tok_s']} tok/s, "
            f"json schema {row['json_schema']['output_tok_s']} tok/s (ratio {row['ratio']}), mask fill "
            f"{row['json_schema']['mask_ms_per_step']} ms/step (the step waited "
            f"{row['json_schema']['mask_wait_ms_per_step']})",
            flush=True,
        )
        for mode in modes:
            times = ", ".join(f"{k} {v}" for k, v in row[mode]["host_ms_per_step"].items() if v)
            print(f"    {mode}: {row[mode]['engine_steps']} steps, host ms a step: {times}", flush=True)
    if ns.json_path:
        Path(ns.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default=None, help="a GPU benchmark shape (e.g. llama3-8b), dummy weights")
    parser.add_argument("--concurrency", default="1,64", help="requests in flight, comma-separated")
    parser.add_argument("--requests", type=int, default=64, help="requests per mode and concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--fill-on-thread",
        choices=("auto", "on", "off"),
        default="auto",
        help="fill masks on a thread beside the engine's (auto: the engine's choice, by its CPUs)",
    )
    parser.add_argument("--json", dest="json_path")
