"""What serving LoRA adapters costs: one closed batch of requests spread over 1, 8 and 32 distinct adapters
(rank 16 on every projection, random weights written as PEFT folders) against the base model alone, in
one run on one engine per setting.

  pagetron bench lora [--model PATH | --shape llama3-8b] [--adapters 1,8,32] [--workload-t] [--requests 64]
      [--prompt-len 128] [--max-tokens 64] [--rank 16] [--max-num-seqs 32] [--json out.json]

``--shape`` runs a GPU benchmark shape with random weights (load_format dummy); ``--workload-t`` takes
workload T's prompts (docs/benchmarks.md: lengths uniform in 128-1024) and its 512 requests of 256
tokens. ``--profile`` adds, per setting, a kernel table (torch.profiler: device time on a GPU, CPU time
otherwise) of one batch of ``--max-num-seqs`` requests for 8 tokens, and the LoRA kernels' share of it.

Every request is greedy and runs to max_tokens (ignore_eos); the requests of a setting use its adapters
round-robin and every adapter fits a device slot (max_loras = the number of adapters), so the figure is the
batched LoRA products themselves, not adapter swapping. Each setting first runs as many other prompts of
the same kind for two tokens (compiling the kernels for its shapes; other prompts, so that the timed batch
finds none of its own in the prefix cache), then the timed batch, then one request alone (concurrency 1:
milliseconds per output token, on an adapter where there are any). On a GPU each setting also reports
``floor_ratio``: the most of base throughput its requests can keep by the roofline (``floor_ratio``
below), at the card's ceilings measured at the start.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path


def write_adapter(
    folder: Path, shapes: dict[str, tuple[int, int]], num_layers: int, rank: int, seed: int
) -> Path:
    """A PEFT folder (adapter_config.json + adapter_model.safetensors) with random weights."""
    import torch
    from safetensors.torch import save_file

    from pagetron.backend.model.llama import PROJECTIONS

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for target, (path, _) in PROJECTIONS.items():
            out_features, in_features = shapes[target]
            block = path.partition(".")[0]  # self_attn or mlp, as in HF's module tree
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            # bf16 on disk, as adapters are usually shipped: 84 MB instead of 168 for the 8B shape's
            a = torch.randn(rank, in_features, generator=generator) * 0.02
            b = torch.randn(out_features, rank, generator=generator) * 0.02
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _prompt(rng: random.Random, vocab: int, length: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]


def run_lora_bench(ns: argparse.Namespace) -> int:
    from pagetron.backend import LLM, LoRARequest, SamplingParams
    from pagetron.backend.benchmarks.gpu_workloads import workload_t
    from pagetron.backend.model.llama import projection_shapes

    if ns.workload_t:  # workload T: 512 requests, prompts of 128-1024 tokens, 256 out
        ns.requests, ns.max_tokens = ns.requests or 512, ns.max_tokens or 256
    ns.requests, ns.max_tokens = ns.requests or 64, ns.max_tokens or 64

    settings = [0, *(int(n) for n in ns.adapters.split(","))]
    rng = random.Random(0)
    config = {k: v for k, v in vars(ns).items() if k not in ("func", "json_path", "command", "workload")}
    result: dict = {"config": config, "runs": []}
    ceilings = _device_ceilings()
    if ceilings is not None:
        result["ceilings"] = asdict(ceilings)
    root = Path(tempfile.mkdtemp(prefix="pagetron-lora-bench-"))
    for count in settings:
        engine = {"max_num_seqs": ns.max_num_seqs, "kv_cache_memory_gb": ns.kv_cache_memory_gb}
        if count:
            engine.update(enable_lora=True, max_loras=count, max_lora_rank=ns.rank)
        if ns.shape:
            from pagetron.backend.benchmarks.gpu_workloads import write_config

            engine.update(model=str(write_config(ns.shape, root / "model")), load_format="dummy")
        elif ns.model:
            engine["model"] = ns.model
        llm = LLM(**engine)
        cfg = llm.engine.model_config
        shapes = projection_shapes(cfg)
        folders = [write_adapter(root / f"a{j}", shapes, cfg.num_layers, ns.rank, j) for j in range(count)]
        loras = [LoRARequest(f"a{j}", j + 1, str(folder)) for j, folder in enumerate(folders)]
        if ns.workload_t:
            ids = workload_t(cfg.vocab_size, seed=0, requests=ns.requests)
            warm_ids = workload_t(cfg.vocab_size, seed=1, requests=ns.requests)
        else:
            ids, warm_ids = (
                [_prompt(rng, cfg.vocab_size, ns.prompt_len) for _ in range(ns.requests)] for _ in "ab"
            )
        prompts = [{"prompt_token_ids": p} for p in ids]
        params = SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True)
        per_request = [loras[k % count] for k in range(ns.requests)] if count else None
        # the warm-up compiles the kernels for this setting's shapes on other prompts of the same kind, so
        # that the timed batch finds none of its own in the prefix cache
        warm = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        llm.generate(
            [{"prompt_token_ids": p} for p in warm_ids], warm, use_tqdm=False, lora_request=per_request
        )
        started = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=per_request)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        llm.generate(prompts[:1], params, use_tqdm=False, lora_request=per_request[:1] if count else None)
        alone_ms = 1e3 * (time.perf_counter() - started) / ns.max_tokens
        tokens = ns.requests * ns.max_tokens
        run = {
            "adapters": count,
            "seconds": round(seconds, 2),
            "output_tok_s": round(tokens / seconds, 1),
            "concurrency_1_ms_per_token": round(alone_ms, 3),
            "prompt_tokens": sum(len(p) for p in ids),
            "prompt_tokens_cached": sum(out.num_cached_tokens for out in outs),  # 0: every prompt computed
        }
        if ceilings is not None:
            lens = [len(p) for p in ids]
            run["floor_ratio"] = floor_ratio(cfg, lens, ns.max_tokens, engine, count, ns.rank, ceilings)
        if ns.profile:
            batch = min(ns.requests, ns.max_num_seqs)
            run["profile"] = kernel_profile(llm, prompts[:batch], per_request[:batch] if count else None)
            print(_profile_text(count, run["profile"]), flush=True)
        result["runs"].append(run)
        print(
            f"{count:3d} adapters: {run['output_tok_s']} output tok/s ({run['seconds']} s); alone "
            f"{run['concurrency_1_ms_per_token']} ms/token",
            flush=True,
        )
        result.setdefault("device", llm.engine.executor.device_name)
        llm.engine.shutdown()
        del llm
        gc.collect()  # the next setting's engine needs the device memory this one held
        _empty_device_cache()
    base, base_ms = result["runs"][0]["output_tok_s"], result["runs"][0]["concurrency_1_ms_per_token"]
    for run in result["runs"]:
        run["of_base"] = round(run["output_tok_s"] / base, 3)
        run["concurrency_1_added_ms_per_token"] = round(run["concurrency_1_ms_per_token"] - base_ms, 3)
    print(
        "of base: "
        + ", ".join(
            f"{r['adapters']} adapters {r['of_base']}"
            + (f" (floor ratio {r['floor_ratio']})" if "floor_ratio" in r else "")
            for r in result["runs"][1:]
        )
    )
    if ns.json_path:
        Path(ns.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def floor_ratio(
    cfg, prompt_lens: list[int], max_tokens: int, engine: dict, adapters: int, rank: int, ceilings
) -> float:
    """The most of the base model's throughput the requests can keep over ``adapters`` adapters if both
    runs reach the same fraction of their roofline floors (backend/benchmarks/roofline.py's phase floor:
    the adapters' FLOPs on every row, their A and B read by every decode step that has their rows). 1.0
    for the base alone."""
    from pagetron.backend.benchmarks.roofline import ModelShape, Request, engine_floor

    shape = ModelShape(
        hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_layers,
        heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, vocab=cfg.vocab_size, head_dim=cfg.head_dim,
    )  # fmt: skip
    requests = [Request(n, max_tokens) for n in prompt_lens]
    base = engine_floor(shape, requests, ceilings, engine)
    lora = engine_floor(shape, requests, ceilings, engine, adapters=adapters, lora_rank=rank)
    return round(base.phase_seconds / lora.phase_seconds, 3)


# (the fused gate|up expand counts whole, its SiLU-and-mul included)
LORA_KERNELS = ("_shrink_kernel", "_expand_kernel", "_expand_silu_and_mul_kernel")


def kernel_profile(llm, prompts: list, loras: list | None, tokens: int = 8) -> dict:
    """Kernel (or op) times of one generate call: the total, the LoRA kernels' part and the top rows."""
    import torch

    from pagetron.backend import SamplingParams

    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    with torch.profiler.profile(activities=activities) as prof:
        llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = event.device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            rows.append((event.key, us / 1e3, event.count))
    rows.sort(key=lambda row: -row[1])
    lora = [row for row in rows if any(name in row[0] for name in LORA_KERNELS)]
    return {
        "clock": "device" if cuda else "cpu",
        "requests": len(prompts),
        "tokens": tokens,
        "total_ms": round(sum(row[1] for row in rows), 3),
        "lora_ms": round(sum(row[1] for row in lora), 3),
        "lora_launches": sum(row[2] for row in lora),
        "top": [[name[:100], round(ms, 3), n] for name, ms, n in rows[:15]],
    }


def _profile_text(count: int, profile: dict) -> str:
    lines = [
        f"    {count} adapters, {profile['requests']} requests x {profile['tokens']} tokens: "
        f"{profile['total_ms']} ms of {profile['clock']} time, LoRA kernels {profile['lora_ms']} ms "
        f"({profile['lora_launches']} launches)"
    ]
    lines += [f"    {ms:10.3f} ms {n:7d}  {name[:70]}" for name, ms, n in profile["top"][:10]]
    return "\n".join(lines)


def _device_ceilings():
    """The card's matmul and copy ceilings, measured now (roofline.py); None on a CPU, whose steps are
    bound by other things than the floor counts."""
    import torch

    if not torch.cuda.is_available():
        return None
    from pagetron.backend.benchmarks.roofline import measure_ceilings

    ceilings = measure_ceilings("cuda")
    _empty_device_cache()  # the copy's 4 GB go back before the first engine sizes its memory
    return ceilings


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2")
    parser.add_argument("--shape", default=None, help="a GPU benchmark shape (e.g. llama3-8b), dummy weights")
    parser.add_argument("--adapters", default="1,8,32", help="adapter counts to compare with the base model")
    parser.add_argument(
        "--workload-t",
        action="store_true",
        help="workload T's prompts; 512 requests x 256 tokens unless given",
    )
    parser.add_argument("--requests", type=int, default=None, help="default 64 (512 with --workload-t)")
    parser.add_argument("--prompt-len", type=int, default=128, help="without --workload-t")
    parser.add_argument("--max-tokens", type=int, default=None, help="default 64 (256 with --workload-t)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=0.5)
    parser.add_argument("--profile", action="store_true", help="a kernel table per setting (torch.profiler)")
    parser.add_argument("--json", dest="json_path")
