"""Launch-shape sweep of the LoRA shrink and expand kernels on a model's projections (GPU only).

  python -m pagetron.backend.benchmarks.lora_kernel_sweep [--shape llama3-8b] [--rank 16]
      [--cases 1x1,128x1,128x32] [--json out.json]

For each fused projection (qkv, o, gate_up, down) and each case ROWSxSLOTS (a decode step's rows spread
round-robin over that many adapter slots) it times every candidate inside a CUDA graph, as a decode step
replays them: the shrink by (BLOCK_K, K tiles a program, warps), the expand by (BLOCK_N, warps). Each
candidate's output is checked against the default launch's; the table gives the default's time and the
fastest candidate's.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from triton.testing import do_bench_cudagraph

from pagetron.backend.benchmarks.gpu_workloads import SHAPES
from pagetron.kernels import lora

SHRINK = {"block_k": (64, 128), "tiles": (1, 2, 4, 8), "num_warps": (4,)}
EXPAND = {"block_n": (32, 64, 128, 256), "num_warps": (4, 8)}


def projections(config: dict, rank: int) -> dict[str, tuple[int, list[int], int]]:
    """name -> (K, part widths of the output, rank)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
    d = config.get("head_dim") or h // heads
    return {
        "qkv": (h, [heads * d, kv_heads * d, kv_heads * d], rank),
        "o": (heads * d, [h], rank),
        "gate_up": (h, [i, i], rank),
        "down": (i, [h], rank),
    }


def _time(fn) -> float:
    return 1e3 * do_bench_cudagraph(fn, rep=30)  # us


def sweep_case(k: int, parts: list[int], rank: int, rows: int, slots: int) -> dict:
    gen = torch.Generator("cuda").manual_seed(0)
    n, p = sum(parts), len(parts)
    x = torch.randn(rows, k, generator=gen, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(slots, p * rank, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(slots, n, rank, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    token_slots = (torch.arange(rows, device="cuda") % slots).to(torch.int32)
    grouped = lora.group_rows(token_slots, slots)
    starts = [sum(parts[:j]) for j in range(p)]
    t = torch.zeros(rows, p * rank, device="cuda", dtype=torch.float32)
    reference_t = lora.lora_shrink(x, a, grouped, t.clone())
    y0 = torch.randn(rows, n, generator=gen, device="cuda", dtype=torch.bfloat16)
    reference_y = lora.lora_expand(reference_t, b, grouped, y0.clone(), starts)

    def shrink(**launch):
        return lambda: lora.lora_shrink(x, a, grouped, t.zero_(), **launch)

    def expand(**launch):
        y = y0.clone()
        return lambda: lora.lora_expand(reference_t, b, grouped, y, starts, **launch), y

    result = {"shrink_default_us": _time(shrink()), "shrink": [], "expand": []}
    for values in itertools.product(*SHRINK.values()):
        launch = dict(zip(SHRINK, values))
        t.zero_()
        lora.lora_shrink(x, a, grouped, t, **launch)
        ok = torch.allclose(t, reference_t, rtol=1e-2, atol=1e-3)
        result["shrink"].append({**launch, "us": round(_time(shrink(**launch)), 2), "ok": ok})
    fn, _ = expand()
    result["expand_default_us"] = _time(fn)
    for values in itertools.product(*EXPAND.values()):
        launch = dict(zip(EXPAND, values))
        y = lora.lora_expand(reference_t, b, grouped, y0.clone(), starts, **launch)
        ok = torch.allclose(y.float(), reference_y.float(), rtol=1e-2, atol=1e-2)
        fn, _ = expand(**launch)
        result["expand"].append({**launch, "us": round(_time(fn), 2), "ok": ok})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cases", default="1x1,128x1,128x32", help="ROWSxSLOTS,...")
    parser.add_argument("--json", dest="json_path")
    ns = parser.parse_args(argv)
    out = {"device": torch.cuda.get_device_name(), "shape": ns.shape, "rank": ns.rank, "cases": []}
    print(f"{'proj':8} {'case':>7}  {'shrink us':>9} {'best':>7} {'(block_k, tiles, warps)':24} "
          f"{'expand us':>9} {'best':>7} (block_n, warps)")  # fmt: skip
    for name, (k, parts, rank) in projections(SHAPES[ns.shape], ns.rank).items():
        for case in ns.cases.split(","):
            rows, slots = (int(v) for v in case.split("x"))
            r = sweep_case(k, parts, rank, rows, slots)
            bs = min((c for c in r["shrink"] if c["ok"]), key=lambda c: c["us"])
            be = min((c for c in r["expand"] if c["ok"]), key=lambda c: c["us"])
            bad = [c for c in r["shrink"] + r["expand"] if not c["ok"]]
            wrong = f"  {len(bad)} WRONG" if bad else ""
            print(f"{name:8} {case:>7}  {r['shrink_default_us']:9.2f} {bs['us']:7.2f} "
                  f"{str((bs['block_k'], bs['tiles'], bs['num_warps'])):24} {r['expand_default_us']:9.2f} "
                  f"{be['us']:7.2f} {(be['block_n'], be['num_warps'])}{wrong}", flush=True)  # fmt: skip
            out["cases"].append({"projection": name, "rows": rows, "slots": slots, **r})
    if ns.json_path:
        with open(ns.json_path, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
