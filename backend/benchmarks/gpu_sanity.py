"""GPU sanity for the engine on the torch reference path: fp32 greedy parity with HF on CUDA (tiny random
Llama/Qwen3), then a reduced workload T on the Llama-2-13B shape with dummy bf16 weights.

Usage (on a CUDA machine): python -m pagetron.backend.benchmarks.gpu_sanity NUM_REQUESTS OUTPUT_LEN
A stop-gap until `pagetron bench` runs the GPU workloads of BENCHMARKS.md.
"""

import json
import os
import random
import sys
import tempfile
import time

import torch
import transformers

from pagetron.backend import LLM, SamplingParams


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    tmp = tempfile.mkdtemp()
    for arch, cls, extra in [
        ("llama", transformers.LlamaConfig, {}),
        ("qwen3", transformers.Qwen3Config, {"head_dim": 16}),
    ]:
        cfg = cls(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **extra,
        )
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg).float()
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.1)
        folder = os.path.join(tmp, arch)
        hf.save_pretrained(folder)
        hf = hf.cuda().eval()
        rng = random.Random(1)
        prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 60))] for _ in range(16)]
        exp = []
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
            )
            exp.append(out[0, len(p) :].tolist())
        llm = LLM(folder, dtype="float32", block_size=16, gpu_memory_utilization=0.3)
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(temperature=0, max_tokens=12, min_tokens=12),
            use_tqdm=False,
        )
        same = sum(o.outputs[0].token_ids == e for o, e in zip(outs, exp))
        rows.append((f"parity fp32 cuda {arch}", f"{same}/16 identical"))
        del llm
        torch.cuda.empty_cache()
    # Llama-2-13B shape, dummy bf16
    cfg13 = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    )
    f13 = os.path.join(tmp, "l13")
    os.makedirs(f13)
    json.dump(cfg13, open(os.path.join(f13, "config.json"), "w"))
    t0 = time.time()
    llm = LLM(f13, load_format="dummy", max_num_seqs=256, max_num_batched_tokens=8192)
    rows.append(("13B engine start s", f"{time.time() - t0:.1f}"))
    rows.append(("KV blocks", llm.engine.block_manager.num_blocks))
    rng = random.Random(0)
    N, OUT = int(sys.argv[1]), int(sys.argv[2])
    prompts = [
        {"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(rng.randint(128, 1024))]}
        for _ in range(N)
    ]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    t0 = time.time()
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=OUT, ignore_eos=True), use_tqdm=False
    )
    torch.cuda.synchronize()
    dt = time.time() - t0
    ntok = sum(len(o.outputs[0].token_ids) for o in outs)
    nin = sum(len(p["prompt_token_ids"]) for p in prompts)
    rows.append(
        (
            f"13B workload T-lite ({N} req, {OUT} out)",
            f"{ntok / dt:.0f} out tok/s, {(ntok + nin) / dt:.0f} total tok/s, {dt:.1f} s",
        )
    )
    rows.append(("preemptions", llm.engine.scheduler.num_preemptions))
    for k, v in rows:
        print(f"{k:45} {v}")


if __name__ == "__main__":
    main()
