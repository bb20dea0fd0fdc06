"""Triton kernels compiled for the H100 (sm_90) on a machine without a GPU (benchmarks/kernel_compile.py):
in a fresh interpreter, since the kernel tests interpret triton in this one."""

import json
import os
import subprocess
import sys
import textwrap


def test_a_kernel_compiles_for_sm90_without_a_gpu_and_a_broken_one_is_reported(tmp_path):
    script = tmp_path / "compile_two.py"
    script.write_text(
        textwrap.dedent(
            """
            import json

            import torch
            import triton
            import triton.language as tl

            from pagetron.backend.benchmarks.kernel_compile import compile_only
            from pagetron.kernels.rms_norm import fused_add_rms_norm

            @triton.jit
            def broken(x_ptr, BLOCK: tl.constexpr):
                tl.static_assert(BLOCK < 0, "BLOCK must be negative")

            x = torch.randn(8, 4096, dtype=torch.bfloat16)
            with compile_only(90, 132) as compiled:
                fused_add_rms_norm(x, torch.randn_like(x), torch.ones(4096, dtype=torch.bfloat16), 1e-5)
                broken[(1,)](x, BLOCK=16)
            print(json.dumps(compiled))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    norm, bad = json.loads(done.stdout.splitlines()[-1])
    assert norm["kernel"] == "_rms_norm_kernel" and "error" not in norm
    assert norm["constants"] == {"inner": 1, "HAS_RESIDUAL": True, "HAS_DELTA": False, "BLOCK": 4096}
    assert norm["num_warps"] == 8 and 0 <= norm["shared_bytes"] <= 232448 and norm["registers"] > 0
    assert bad["kernel"] == "broken" and "BLOCK must be negative" in bad["error"]
