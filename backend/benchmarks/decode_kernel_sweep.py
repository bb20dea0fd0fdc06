"""Launch-shape sweep of the paged decode attention kernel on real head layouts (GPU only).

  python -m pagetron.backend.benchmarks.decode_kernel_sweep [--batch 256] [--caches bf16,fp8]
      [--block-n 32,64,128] [--warps 4,8] [--stages 1,2] [--json out.json]

For each model shape and cache dtype it times the split kernel (plus merge) inside a CUDA graph for every
(BLOCK_N, warps, stages) candidate, checks the output against the fp32 reference, and prints the K/V
read rate; the fastest candidates per cache dtype are what ``_LAUNCH`` should hold.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import torch
import triton

from pagetron.kernels import paged_decode_attention as pda
from pagetron.kernels.attention_ref import FP8_DTYPE, paged_decode_attention_ref

SHAPES = {"llama2-13b": (40, 40, 128), "llama3-8b": (32, 8, 128)}  # (q heads, kv heads, head_dim)
BLOCK_SIZE = 16


def make_inputs(batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, fp8: bool, seed: int = 0):
    gen = torch.Generator("cuda").manual_seed(seed)
    lens = torch.randint(128, 1300, (batch,), generator=gen, device="cuda", dtype=torch.int32)
    blocks_per_seq = (lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    max_blocks = int(blocks_per_seq.max())
    num_blocks = int(blocks_per_seq.sum()) + 8
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    if fp8:
        k, v = k.to(FP8_DTYPE), v.to(FP8_DTYPE)
    tables = torch.randperm(num_blocks, generator=gen, device="cuda", dtype=torch.int32)[: batch * max_blocks]
    tables = tables.view(batch, max_blocks) if tables.numel() == batch * max_blocks else None
    if tables is None:  # fewer blocks than batch * max_blocks: rows may share blocks (reads are the same)
        tables = torch.randint(
            0, num_blocks, (batch, max_blocks), generator=gen, device="cuda", dtype=torch.int32
        )
    q = torch.randn(batch, num_q_heads, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    return q, k, v, tables, lens


def reference(q, k, v, tables, lens, scale, chunk: int = 16) -> torch.Tensor:
    outs = []
    for start in range(0, q.shape[0], chunk):
        rows = tables[start : start + chunk].long()
        local = torch.arange(rows.numel(), device="cuda", dtype=torch.int32).view(rows.shape)
        keys, values = k[rows.flatten()].float(), v[rows.flatten()].float()
        part = slice(start, start + chunk)
        outs.append(paged_decode_attention_ref(q[part].float(), keys, values, local, lens[part], scale))
    return torch.cat(outs)


def sweep(batch: int, caches: list[bool], candidates: list[tuple[int, int, int]]) -> list[dict]:
    rows = []
    saved = dict(pda._LAUNCH)
    try:
        for shape, fp8 in itertools.product(SHAPES, caches):
            num_q, num_kv, head_dim = SHAPES[shape]
            q, k, v, tables, lens = make_inputs(batch, num_q, num_kv, head_dim, fp8)
            scale = head_dim**-0.5
            expected = reference(q, k, v, tables, lens, scale)
            kv_bytes = int(lens.sum()) * num_kv * head_dim * 2 * k.element_size()
            run = functools.partial(pda.paged_decode_attention, q, k, v, tables, lens, scale)
            for block_n, warps, stages in candidates:
                pda._LAUNCH[fp8] = (block_n, warps, stages)
                try:
                    error = float((run().float() - expected).norm() / expected.norm())
                    us = triton.testing.do_bench_cudagraph(run, return_mode="median") * 1e3
                except Exception as e:  # out of shared memory or registers for this shape
                    print(f"{shape} fp8={fp8} {block_n}/{warps}/{stages}: {type(e).__name__}: {e}")
                    continue
                rows.append(
                    {
                        "shape": shape, "fp8": fp8, "block_n": block_n, "warps": warps, "stages": stages,
                        "us": round(us, 1), "tb_s": round(kv_bytes / us / 1e6, 2), "rel_err": error,
                    }
                )  # fmt: skip
            pda._LAUNCH.update(saved)
    finally:
        pda._LAUNCH.update(saved)
    return rows


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--caches", default="bf16,fp8")
    parser.add_argument("--block-n", default="32,64,128")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    candidates = list(itertools.product(ints(args.block_n), ints(args.warps), ints(args.stages)))
    rows = sweep(args.batch, [c == "fp8" for c in args.caches.split(",")], candidates)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'shape':<11} {'fp8':<5} best BLOCK_N/warps/stages      us   TB/s  rel_err")
    for (shape, fp8), group in itertools.groupby(rows, key=lambda r: (r["shape"], r["fp8"])):
        for r in sorted(group, key=lambda r: r["us"])[:3]:
            launch = f"{r['block_n']}/{r['warps']}/{r['stages']}"
            figures = f"{r['us']:>7.1f} {r['tb_s']:>5.2f}  {r['rel_err']:.1e}"
            print(f"{shape:<11} {fp8!s:<5} {launch:<24} {figures}")


if __name__ == "__main__":
    main()
