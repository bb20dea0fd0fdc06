"""Workloads T (throughput) and P (prefix caching) of docs/benchmarks.md on a GPU, with HF transformers
baselines measured in the same run on the same (dummy) weights.

  pagetron bench gpu --shape llama2-13b --json results.json [--hf-generate-batch-prompts 64]
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

from pagetron.backend.benchmarks.roofline import ModelShape, Request, engine_floor, measure_ceilings

SHAPES = {
    "llama2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}


def write_config(shape: str, folder: Path) -> Path:
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        **SHAPES[shape],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def workload_t(vocab: int, seed: int = 0, requests: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(128, 1024))] for _ in range(requests)]


def workload_p(vocab: int, seed: int = 1, requests: int = 256) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(3, vocab) for _ in range(2048)]
    return [system + [rng.randrange(3, vocab) for _ in range(128)] for _ in range(requests)]


def params_count(shape: str) -> int:
    s = SHAPES[shape]
    h, i, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + 2 * v * h


def run_engine(folder: Path, prompts: list[list[int]], output_len: int, **engine_args) -> dict:
    import torch

    from pagetron.backend import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(str(folder), load_format="dummy", **engine_args)
    startup_s = time.perf_counter() - started
    llm.generate(
        [{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False
    )
    torch.cuda.synchronize()
    started = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    result = {
        "seconds": round(seconds, 2),
        "startup_s": round(startup_s, 1),
        "output_tok_s": round(out_tokens / seconds, 1),
        "total_tok_s": round((out_tokens + in_tokens) / seconds, 1),
        "preemptions": llm.engine.scheduler.num_preemptions,
        "kv_blocks": llm.engine.block_manager.num_blocks,
        "prefix_cache_hit_rate": round(
            llm.engine.block_manager.prefix_cache_hits
            / max(llm.engine.block_manager.prefix_cache_queries, 1),
            3,
        ),
    }
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run_hf_baselines(folder: Path, prompts: list[list[int]], generate_batch_prompts: int) -> dict:
    """HF generate() at batch 1 and naive batching at 8 (prompt 128, 128 new tokens, as the seed article),
    and continuous batching (generate_batch) on the first prompts of workload T, 256 new tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    results = {}
    for batch in (1, 8):
        ids = torch.tensor([p[:128] for p in prompts[:batch]], device="cuda")
        kwargs = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
        model.generate(
            ids[:, :16],
            attention_mask=torch.ones_like(ids[:, :16]),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        torch.cuda.synchronize()
        results[f"hf_generate_batch{batch}_tok_s"] = round(batch * 128 / (time.perf_counter() - started), 1)
    if generate_batch_prompts and hasattr(model, "generate_batch"):
        subset = prompts[:generate_batch_prompts]
        gen_config = GenerationConfig(max_new_tokens=256, do_sample=False, eos_token_id=-1, pad_token_id=0)
        torch.cuda.synchronize()
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=subset, generation_config=gen_config)
        torch.cuda.synchronize()
        tokens = sum(len(o.generated_tokens) for o in outputs.values())
        results["hf_generate_batch_continuous_tok_s"] = round(tokens / (time.perf_counter() - started), 1)
        results["hf_generate_batch_continuous_prompts"] = len(subset)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def run_gpu_bench(ns: argparse.Namespace) -> int:
    import torch

    folder = write_config(ns.shape, Path(tempfile.mkdtemp()) / ns.shape)
    vocab = SHAPES[ns.shape]["vocab_size"]
    engine_args = {"max_num_seqs": 256, "max_num_batched_tokens": 8192}
    t_prompts = workload_t(vocab)
    result: dict = {"shape": ns.shape, "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name()}
    ceilings = measure_ceilings()  # this card, this run: what the floors below are computed with
    result["ceilings"] = asdict(ceilings)
    shape = ModelShape.from_hf_config(SHAPES[ns.shape])
    t = run_engine(folder, t_prompts, 256, **engine_args)
    floor = engine_floor(shape, [Request(len(p), 256) for p in t_prompts], ceilings, engine_args)
    t["mfu"] = round(floor.flops / t["seconds"] / ceilings.matmul_flops, 3)
    t["roofline"] = floor.report(t["seconds"], ceilings)
    result["workload_T"] = t
    print(f"T: {t}", flush=True)
    if not ns.skip_prefix:
        p_prompts = workload_p(vocab)
        on = run_engine(folder, p_prompts, 256, enable_prefix_caching=True, **engine_args)
        off = run_engine(folder, p_prompts, 256, enable_prefix_caching=False, **engine_args)
        # with caching, every request after the first finds the 2,048-token system prompt cached
        cached = [Request(len(p), 256, cached_len=2048 if i else 0) for i, p in enumerate(p_prompts)]
        uncached = [Request(len(p), 256) for p in p_prompts]
        for run, requests in ((on, cached), (off, uncached)):
            floor = engine_floor(shape, requests, ceilings, engine_args)
            run["roofline"] = floor.report(run["seconds"], ceilings)
        result["workload_P"] = {
            "caching_on": on,
            "caching_off": off,
            "speedup": round(on["output_tok_s"] / off["output_tok_s"], 2),
        }
        print(f"P: {result['workload_P']}", flush=True)
    if not ns.skip_hf:
        result["hf"] = run_hf_baselines(folder, t_prompts, ns.hf_generate_batch_prompts)
        hf = result["hf"]
        result["ratios"] = {
            k.replace("_tok_s", ""): round(t["output_tok_s"] / v, 1)
            for k, v in hf.items()
            if k.endswith("_tok_s")
        }
        print(f"HF: {hf} ratios {result['ratios']}", flush=True)
    print(json.dumps(result, indent=2))
    if ns.json_path:
        Path(ns.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-13b")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--skip-prefix", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--hf-generate-batch-prompts",
        type=int,
        default=64,
        help="HF continuous batching runs on this many workload-T prompts (0: skip)",
    )


if __name__ == "__main__":
    _parser = argparse.ArgumentParser()
    add_arguments(_parser)
    raise SystemExit(run_gpu_bench(_parser.parse_args()))
