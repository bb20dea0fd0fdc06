"""GPU sanity for the engine: fp32 greedy parity with HF on CUDA (tiny random Llama and Qwen3) and a
reduced workload T on the Llama-2-13B shape with dummy bf16 weights, for each attention setup.

Usage (on a CUDA machine):
  python -m pagetron.backend.benchmarks.gpu_sanity --requests 256 --output-len 128 \
      --setups torch,triton-eager,triton
A stop-gap until `pagetron bench` runs the GPU workloads of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import tempfile
import time
from pathlib import Path

import torch
import transformers

from pagetron.backend import LLM, SamplingParams
from pagetron.backend.benchmarks.gpu_workloads import write_config

SETUPS = {  # name -> engine arguments
    "torch": {"attention_backend": "torch", "enforce_eager": True},
    "triton-eager": {"attention_backend": "triton", "enforce_eager": True},
    "triton": {"attention_backend": "triton"},
}


def parity(tmp: str, setup: str) -> list[tuple[str, str]]:
    rows = []
    for arch, cls, extra in [
        ("llama", transformers.LlamaConfig, {}),
        ("qwen3", transformers.Qwen3Config, {"head_dim": 64}),
    ]:
        cfg = cls(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, **extra)  # fmt: skip
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg).float()
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.1)
        folder = os.path.join(tmp, f"{arch}-{setup}")
        hf.save_pretrained(folder)
        hf = hf.cuda().eval()
        rng = random.Random(1)
        prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 300))] for _ in range(16)]
        expected = []
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                              do_sample=False, pad_token_id=0)  # fmt: skip
            expected.append(out[0, len(p) :].tolist())
        llm = LLM(folder, dtype="float32", gpu_memory_utilization=0.3, max_num_batched_tokens=512,
                  **SETUPS[setup])  # fmt: skip
        params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        same = sum(o.outputs[0].token_ids == e for o, e in zip(outs, expected))
        rows.append((f"parity fp32 {arch} [{setup}]", f"{same}/16 identical to HF"))
        del llm, hf
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def throughput(tmp: str, setup: str, requests: int, output_len: int) -> list[tuple[str, str]]:
    folder = str(write_config("llama2-13b", Path(tmp) / "llama2-13b"))
    started = time.time()
    llm = LLM(folder, load_format="dummy", max_num_seqs=256, max_num_batched_tokens=8192, **SETUPS[setup])
    start_s = time.time() - started
    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(rng.randint(128, 1024))]}
        for _ in range(requests)
    ]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    started = time.time()
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    seconds = time.time() - started
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    rows = [(f"13B [{setup}] start-up s, KV blocks", f"{start_s:.1f}, {llm.engine.block_manager.num_blocks}"),
            (f"13B [{setup}] {requests} req x {output_len} out",
             f"{out_tokens / seconds:.0f} out tok/s, {(out_tokens + in_tokens) / seconds:.0f} total tok/s, "
             f"{seconds:.1f} s, {llm.engine.scheduler.num_preemptions} preemptions")]  # fmt: skip
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--setups", default="torch,triton-eager,triton")
    parser.add_argument("--skip-parity", action="store_true")
    ns = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tmp = tempfile.mkdtemp()
    rows = []
    for setup in ns.setups.split(","):
        if not ns.skip_parity:
            rows += parity(tmp, setup)
        rows += throughput(tmp, setup, ns.requests, ns.output_len)
        for k, v in rows[-2:]:
            print(f"{k:48} {v}", flush=True)
    print("\n" + "\n".join(f"{k:48} {v}" for k, v in rows))


if __name__ == "__main__":
    main()
