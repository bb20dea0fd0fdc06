"""Launch-shape sweep of the LoRA shrink and expand kernels on a model's projections (GPU only).

  python -m pagetron.backend.benchmarks.lora_kernel_sweep [--shape llama3-8b] [--rank 16]
      [--cases 1x1,128x1,128x32] [--json out.json]

For each fused projection (qkv, o, gate_up, down) and each case ROWSxSLOTS (a decode step's rows spread
round-robin over that many adapter slots) it times every candidate inside a CUDA graph, as a decode step
replays them: the shrink by (BLOCK_K, K tiles a program, warps), the expand by (BLOCK_N, warps). Each
candidate's output is checked against the default launch's; the table gives the default's time and the
fastest candidate's. For gate_up it also times the expand fused into the SiLU-and-mul after it
(``lora_expand_silu_and_mul``, what eager steps run) by (BLOCK_N, warps) against the expand in place
followed by silu_and_mul; a case such as 8192x4 is a prefill chunk (64-row blocks).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import torch
from triton.testing import do_bench_cudagraph

from pagetron.backend.benchmarks.gpu_workloads import SHAPES
from pagetron.kernels import lora

SHRINK = {"block_k": (64, 128), "tiles": (1, 2, 4, 8), "num_warps": (4,)}
EXPAND = {"block_n": (32, 64, 128, 256), "num_warps": (4, 8)}
FUSED_SILU = {"block_n": (32, 64, 128), "num_warps": (4, 8)}


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
    if p == 2 and parts[0] == parts[1]:  # gate_up: the expand fused into the SiLU-and-mul
        result.update(fused_silu(reference_t, b, token_slots, y0, slots))
    return result


def fused_silu(
    t: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, gate_up: torch.Tensor, slots: int
) -> dict:
    """gate_up's expand in place then silu_and_mul, against the fused kernel's launch candidates."""
    from pagetron.kernels.silu_and_mul import silu_and_mul

    grouped = lora.group_rows(token_slots, slots)
    all_rows = lora.group_rows(token_slots + 1, slots + 1)
    size = gate_up.shape[1] // 2
    reference = silu_and_mul(lora.lora_expand(t, b, grouped, gate_up.clone(), [0, size]))
    work = gate_up.clone()  # the timed replays add to it again and again: only the time counts

    def unfused():
        return silu_and_mul(lora.lora_expand(t, b, grouped, work, [0, size]))

    result = {"silu_unfused_us": round(_time(unfused), 2), "silu_fused": []}
    for values in itertools.product(*FUSED_SILU.values()):
        launch = dict(zip(FUSED_SILU, values))
        out = lora.lora_expand_silu_and_mul(gate_up, t, b, all_rows, **launch)
        ok = torch.allclose(out.float(), reference.float(), rtol=1e-2, atol=1e-2)
        fn = functools.partial(lora.lora_expand_silu_and_mul, gate_up, t, b, all_rows, **launch)
        result["silu_fused"].append({**launch, "us": round(_time(fn), 2), "ok": ok})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cases", default="1x1,128x1,128x32,8192x4", help="ROWSxSLOTS,...")
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
            if "silu_fused" in r:
                bf = min((c for c in r["silu_fused"] if c["ok"]), key=lambda c: c["us"])
                default = next(c for c in r["silu_fused"] if c["block_n"] == lora.EXPAND_SILU_BLOCK_N
                               and c["num_warps"] == 4)  # fmt: skip
                print(f"{'  +silu':8} {case:>7}  expand in place + silu_and_mul "
                      f"{r['silu_unfused_us']:.2f} us; fused {default['us']:.2f}, best {bf['us']:.2f} "
                      f"{(bf['block_n'], bf['num_warps'])}", flush=True)  # fmt: skip
            out["cases"].append({"projection": name, "rows": rows, "slots": slots, **r})
    if ns.json_path:
        with open(ns.json_path, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
