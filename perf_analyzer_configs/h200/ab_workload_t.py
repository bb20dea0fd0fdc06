"""Workload T (Llama-3-8B shape, dummy weights, 512 requests) on whichever pagetron tree is importable:
engine startup, then each run's output tokens/s (a fresh seed per run, so no run hits another's prefix
cache), and optionally one more run under cProfile (its stats go to OUT/LABEL.prof).

  python ab_workload_t.py LABEL OUT [ENGINE_ARGS_JSON] [RUNS] [PROFILE]

Both the engine before the architecture work (8afbc90) and today's run it: it drives the engine with
add_request and step only (see ab_workload_t.sh).
"""

import cProfile
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from pagetron.backend import LLM, SamplingParams
from pagetron.backend.benchmarks.gpu_workloads import workload_t, write_config

label, out = sys.argv[1], sys.argv[2]
extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
runs = int(sys.argv[4]) if len(sys.argv) > 4 else 1
profile = int(sys.argv[5]) if len(sys.argv) > 5 else 0
folder = write_config("llama3-8b", Path(tempfile.mkdtemp()) / "m")
args = {"max_num_seqs": 256, "max_num_batched_tokens": 8192, **extra}
started = time.perf_counter()
llm = LLM(str(folder), load_format="dummy", **args)
print(label, "startup", round(time.perf_counter() - started, 1), flush=True)
engine = llm.engine
llm.generate([{"prompt_token_ids": [5] * 64}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)


def run(seed: int, prof: cProfile.Profile | None = None) -> dict:
    prompts = workload_t(128256, seed=seed)
    params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for p in prompts:
        engine.add_request({"prompt_token_ids": p}, params)
    if prof:
        prof.enable()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    if prof:
        prof.disable()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tok_s = round(512 * 256 / seconds, 1)
    return {"seed": seed, "seconds": round(seconds, 2), "output_tok_s": tok_s, "steps": steps}


results = {"label": label, "args": args, "gpu": torch.cuda.get_device_name(), "runs": []}
for i in range(runs):
    results["runs"].append(run(i))
    print(label, results["runs"][-1], flush=True)
if profile:
    prof = cProfile.Profile()
    results["cprofile"] = run(100, prof)
    prof.dump_stats(f"{out}/{label}.prof")
    print(label, "cprofile", results["cprofile"], flush=True)
Path(f"{out}/{label}.json").write_text(json.dumps(results, indent=1))
