"""Compiles the engine's OpenAI-Triton kernels for an NVIDIA GPU on a machine without one.

  python -m pagetron.backend.benchmarks.kernel_compile [--shape llama3-8b] [--arch 90] [--sms 132]
      [--max-num-seqs 256] [--max-loras 32] [--kv-cache-dtypes auto,fp8] [--json out.json]

Triton compiles ahead of time for any target its backends know (its wheel ships ptxas), so a kernel that
does not compile for the GPU, or that asks for more shared memory than the GPU gives a block, is found here
instead of in a GPU session. The engine runs on the CPU at a benchmark shape, with every Triton launch
replaced by a compile for the target (nothing runs: outputs stay as allocated) and the GEMMs, which are
torch's (cuBLAS on a GPU), replaced by empty outputs. What it drives is what a GPU run launches:

  - the decode CUDA graphs' passes, at every graph batch size, on the captured path (LoRA deltas for the
    fused norm and SiLU-and-mul kernels), and decode steps through them, padded as replays are;
  - prefill chunks of max_num_batched_tokens, mixed steps, decodes over a context near max_model_len,
    rows under several adapters and under none, a JSON-schema request's bitmask in the sampler (where
    the bundled tokenizer's ids fit the shape's vocabulary);
  - each KV-cache dtype asked for (LoRA and the schema with the first only).

One decoder layer is built: every layer launches the same kernels at the same shapes. Each compiled variant
is listed with its constants, warps, stages, shared memory and (cuobjdump) registers and spills. Exits 1 if
a compile failed or a variant needs more shared memory than ``--arch`` allows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# the most shared memory one block may use (bytes, the opt-in maximum), per compute capability
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


class _TargetDriver:
    """Triton's active driver, answering for a GPU that is not there: the target, device 0, stream 0."""

    def __init__(self, target: Any):
        self.target = target

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


def _empty_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@contextlib.contextmanager
def compile_only(arch: int, sms: int) -> Iterator[list[dict]]:
    """Within it, a Triton launch compiles its kernel for ``cuda:arch`` and launches nothing; the engine
    may run on the CPU with the Triton kernels. Yields the list of variants compiled (dicts, see _record)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from pagetron.backend.executor import worker
    from pagetron.backend.model.lora import LoRAContext
    from pagetron.kernels import paged_decode_attention

    compiled: list[dict] = []
    launch = JITFunction.run

    def compile_instead(fn: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        cache = fn.device_caches[0][0]
        before = set(cache)
        try:
            kernel = launch(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001 (every failure is listed, then the run fails)
            compiled.append({"kernel": fn.__name__, "error": f"{type(e).__name__}: {e}"[:2000]})
            return None
        if set(cache) != before:
            compiled.append(_record(kernel, arch))
        return kernel

    patches = [
        (JITFunction, "run", compile_instead),
        (torch.nn.functional, "linear", _empty_linear),
        (paged_decode_attention, "_num_sms", lambda device: sms),
        (worker, "resolve_kernels", lambda name, device: "triton"),
        # the CPU has no side stream: the passes a capture takes are marked as_captured instead
        (LoRAContext, "defers", lambda self: self.as_captured),
        (
            LoRAContext,
            "fuses_silu",
            lambda self, fuses=LoRAContext.fuses_silu: fuses(self) and not self.as_captured,
        ),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    active = driver._active  # None until something asked (and reset_active() fails without a GPU)
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield compiled
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        driver._active = active


def _record(kernel: Any, arch: int) -> dict:
    names = list(kernel.src.signature)
    constants = {
        names[index[0]]: value
        for index, value in kernel.src.constants.items()
        if kernel.src.signature[names[index[0]]] == "constexpr"
    }
    meta = kernel.metadata
    row = {
        "kernel": kernel.name,
        "constants": {k: _plain(v) for k, v in constants.items()},
        "num_warps": meta.num_warps,
        "num_stages": meta.num_stages,
        "shared_bytes": meta.shared,
    }
    row.update(_resource_usage(kernel.asm["cubin"]))
    limit = MAX_SHARED_BYTES.get(arch)
    if limit is not None and meta.shared > limit:
        row["error"] = f"needs {meta.shared} bytes of shared memory; sm_{arch} allows {limit} a block"
    return row


def _plain(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def _resource_usage(cubin: bytes) -> dict:
    """Registers, spilled (local) and stack bytes of a cubin's kernel, from the cuobjdump that ships with
    triton."""
    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            done = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True)
        except OSError as e:
            return {"resource_usage_error": str(e)[:300]}
    if done.returncode != 0:
        return {"resource_usage_error": done.stderr.strip()[:300] or f"cuobjdump exited {done.returncode}"}
    text = done.stdout
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(part.split(":", 1) for part in line.split() if ":" in part)
            usage = {"registers": int(fields["REG"]), "spill_bytes": int(fields["LOCAL"]),
                     "stack_bytes": int(fields["STACK"])}  # fmt: skip
    return usage


def _uncaptured_graphs(worker: Any) -> Any:
    """The worker's decode CUDA graphs as a GPU run builds them, each capture and replay running the
    captured path eagerly instead (compiling what the capture would launch)."""
    from pagetron.backend.executor.cuda_graphs import DecodeGraphs

    class UncapturedGraphs(DecodeGraphs):
        def _capture_one(self, batch: int, meta: Any, pool: Any) -> Any:
            self.run_eagerly(batch, meta)
            return None

        def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
            slots = self.lora_context.token_slots if self.lora_context is not None else None
            batch = self.fill(input_ids, positions, meta)
            out = self.run_eagerly(batch, self._meta(batch))[: input_ids.shape[0]]
            if self.lora_context is not None:
                self.lora_context.token_slots = slots
            return out

    graphs = worker.decode_graphs(UncapturedGraphs)
    with torch.inference_mode():
        graphs.capture()
    return graphs


def _drive(ns: argparse.Namespace, folder: Path, kv_cache_dtype: str, first: bool) -> bool:
    """Builds an engine and runs the workload's kinds of step through it (see the module's docstring);
    whether a JSON-schema request was among them."""
    import random

    from pagetron.backend import LLM, LoRARequest, SamplingParams
    from pagetron.backend.benchmarks.lora_bench import write_adapter
    from pagetron.backend.benchmarks.structured_bench import ORDER_SCHEMA, QUESTION
    from pagetron.backend.model.llama import projection_shapes
    from pagetron.backend.model.loader.paths import default_model_path

    args = dict(
        model=str(folder), load_format="dummy", tokenizer=ns.tokenizer or str(default_model_path()),
        device="cpu", dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, kv_cache_memory_gb=0.5,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
    )  # fmt: skip
    if first:
        args.update(enable_lora=True, max_loras=ns.max_loras, max_lora_rank=ns.rank)
    llm = LLM(**args)
    worker = llm.engine.executor.worker
    worker.runner.graphs = _uncaptured_graphs(worker)
    cfg = llm.engine.model_config
    rng = random.Random(0)
    # a prompt near max_model_len (long decode contexts: more attention splits); with the next ones, the
    # first step packs a whole chunk of max_num_batched_tokens
    long = min(ns.max_num_batched_tokens, llm.engine.max_model_len) - 192
    lengths = [long, 700, 300, 200, 129, long]
    vocab = min(cfg.vocab_size, 40000)
    prompts: list = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(n)]} for n in lengths]
    params: list = [SamplingParams(max_tokens=6, ignore_eos=True, temperature=0) for _ in lengths]
    loras: list = [None] * len(lengths)
    if first:
        shapes = projection_shapes(cfg)
        folders = [write_adapter(folder / f"a{j}", shapes, cfg.num_layers, ns.rank, j) for j in range(3)]
        adapters = [LoRARequest(f"a{j}", j + 1, str(path)) for j, path in enumerate(folders)]
        loras = [adapters[0], adapters[1], None, adapters[2], adapters[1], adapters[0]]
    # a JSON-schema row among others, then alone (the mask kernel with and without a row map); the
    # tokenizer's ids must be the model's
    schema = None
    if first and len(llm.engine.tokenizer) <= cfg.vocab_size:
        schema = SamplingParams(max_tokens=6, temperature=0, structured_outputs={"json": ORDER_SCHEMA})
        prompts.append({"messages": [{"role": "user", "content": QUESTION}]})
        params.append(schema)
        loras.append(None)
        # compiled first, or the others could all finish while it compiles and it would never share a step
        [grammar] = llm.engine.grammar_service().grammars(schema.structured_outputs, 1)
        grammar.compiled.result()
    try:
        llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        if schema is not None:
            llm.generate(prompts[-1:], schema, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    return schema is not None


# (kernel, constants) that the workload above must compile: the paths a GPU run takes that no other
# variant covers (a workload change that stops reaching them fails the check instead of passing it)
EXPECTED = [
    ("_expand_kernel", {"ACCUMULATE": False}),  # LoRA deltas, decode graphs
    ("_rms_norm_kernel", {"HAS_DELTA": True}),
    ("_silu_and_mul_kernel", {"HAS_DELTA": True}),
    ("_expand_silu_and_mul_kernel", {}),  # LoRA gate|up fused, eager steps
    ("_apply_token_bitmask_kernel", {"HAS_ROWS": True}),  # a constrained row among others ...
    ("_apply_token_bitmask_kernel", {"HAS_ROWS": False}),  # ... and alone
]


def _missing(compiled: list[dict], with_schema: bool) -> list[dict]:
    return [
        {"kernel": name, "constants": wanted, "error": "the workload compiled no such variant"}
        for name, wanted in EXPECTED
        if (with_schema or name != "_apply_token_bitmask_kernel")
        and not any(
            row["kernel"] == name and wanted.items() <= row.get("constants", {}).items() for row in compiled
        )
    ]


def run(ns: argparse.Namespace) -> dict:
    import logging

    import triton

    from pagetron.backend.benchmarks.gpu_workloads import write_config

    started = time.perf_counter()
    # outputs are garbage, so a constrained row's token breaks its grammar: expected here, not news
    scheduler_log = logging.getLogger("pagetron.backend.core.scheduler")
    level = scheduler_log.level
    scheduler_log.setLevel(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="pagetron-kernel-compile-") as scratch:
            folder = write_config(ns.shape, Path(scratch))  # the model's config; the adapters beside it
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
            with compile_only(ns.arch, ns.sms) as compiled:
                kinds = ns.kv_cache_dtypes.split(",")
                with_schema = [_drive(ns, folder, kind, first=i == 0) for i, kind in enumerate(kinds)]
    finally:
        scheduler_log.setLevel(level)
    compiled += _missing(compiled, any(with_schema))
    failed = [row for row in compiled if "error" in row]
    return {
        "target": f"cuda:{ns.arch}", "triton": triton.__version__, "shape": ns.shape,
        "kv_cache_dtypes": ns.kv_cache_dtypes, "seconds": round(time.perf_counter() - started, 1),
        "variants": compiled, "failed": len(failed),
    }  # fmt: skip


def _summary(result: dict) -> str:
    by_kernel: dict[str, list[dict]] = {}
    for row in result["variants"]:
        by_kernel.setdefault(row["kernel"], []).append(row)
    lines = [f"{'kernel':34} {'variants':>8} {'max shared B':>12} {'max regs':>8} {'spills':>6}  failed"]
    for name, rows in sorted(by_kernel.items()):
        ok = [r for r in rows if "shared_bytes" in r]
        lines.append(
            f"{name:34} {len(rows):8d} {max((r['shared_bytes'] for r in ok), default=0):12d} "
            f"{max((r.get('registers', 0) for r in ok), default=0):8d} "
            f"{sum(r.get('spill_bytes', 0) > 0 for r in ok):6d}  {sum('error' in r for r in rows)}"
        )
    for row in result["variants"]:
        if "error" in row:
            lines.append(f"FAILED {row['kernel']} {row.get('constants', '')}: {row['error']}")
    lines.append(
        f"{len(result['variants'])} variants for {result['target']} (triton {result['triton']}, "
        f"{result['shape']}, KV {result['kv_cache_dtypes']}) in {result['seconds']} s; "
        f"{result['failed']} failed"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", help="a gpu_workloads shape")
    parser.add_argument("--arch", type=int, default=90, help="compute capability: 90 is the H100 and H200")
    parser.add_argument("--sms", type=int, default=132, help="the GPU's SM count (decode splits)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-loras", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--kv-cache-dtypes", default="auto,fp8")
    parser.add_argument("--tokenizer", default=None, help="SmolLM2's tokenizer folder (default: the bundled)")
    parser.add_argument("--json", dest="json_path", default=None)
    ns = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled")
    result = run(ns)
    print(_summary(result), flush=True)
    if ns.json_path:
        Path(ns.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
