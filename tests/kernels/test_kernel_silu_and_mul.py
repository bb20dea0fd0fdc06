"""The Triton SiLU-and-mul kernel equals its torch reference (F.silu(gate) * up).

Without CUDA the kernel runs in the Triton interpreter on small CPU shapes. The interpreter (triton 3.9)
truncates fp32 -> bf16 casts where the GPU rounds to nearest even (cvt.rn); conftest.py makes it round as
the GPU does. With CUDA the same small tests run compiled on the GPU, plus the Llama-2-13B MLP shape
(T=8192, I=13824; run with ``-s`` for the timing line) and a CUDA graph capture.

Tolerance: fp32 to 1e-6 relative (exp and division may differ from torch's by an ulp or two); bf16 /
fp16 outputs bit-equal to torch's except where that moves the rounding of silu: at most 2 ulps there, on
fewer than 1 in 100 elements (on an H200: bf16 none of 113M at the real shape; fp16 1 of 768).
"""

import pytest
import torch

from kernel_testing import DEVICE, for_device, needs_cuda, relative_error, ulp_distance
from pagetron.backend.model.kernel_ops import TORCH_OPS
from pagetron.backend.model.llama import LlamaMLP
from pagetron.kernels import silu_and_mul as kernel_module
from pagetron.kernels.layers_ref import silu_and_mul_ref

# the interpreter's numpy exp overflows to inf for the far-out gates, as intended (silu -> -0)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

silu_and_mul = for_device(kernel_module).silu_and_mul


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
    assert not out.isnan().any(), "an output element was never written"
    if out.dtype == torch.float32:
        assert relative_error(out, ref) < 1e-6
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        assert relative_error(out, ref) < 1e-2
        assert ulp_distance(out, ref).max() <= 2
        assert (out != ref).float().mean() < 1e-2


def random_gate_up(num_tokens, size, dtype, gen, pad=3):
    """[T, 2 * size] as a view with a row stride larger than 2 * size; gates include values far enough
    out that exp(-gate) overflows or silu underflows."""
    wide = torch.randn(num_tokens, 2 * size + 2 * pad, generator=gen) * 4
    wide[0, pad : pad + 6] = torch.tensor([-100.0, -60.0, -20.0, 20.0, 60.0, 100.0])
    return wide.to(DEVICE, dtype)[:, pad : pad + 2 * size]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("size", [128, 300, 1000, 2500])  # 2500: three column blocks, the last partial
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, size):
    gen = torch.Generator().manual_seed(size)
    gate_up = random_gate_up(6, size, dtype, gen)
    before = gate_up.clone()
    out = torch.full((6, size), float("nan"), dtype=dtype, device=DEVICE)
    assert silu_and_mul(gate_up, out=out) is out
    assert_matches_reference(out, silu_and_mul_ref(gate_up))
    assert torch.equal(gate_up, before)
    assert torch.equal(silu_and_mul(gate_up), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_lora_delta_gives_the_bits_of_adding_it_first(dtype):
    """gate_up + delta on the rows with an adapter slot (rounded as the LoRA expand adds in place); rows
    of slot -1 hold NaN that must never be read."""
    gen = torch.Generator().manual_seed(9)
    gate_up = random_gate_up(5, 1000, dtype, gen)
    slots = torch.tensor([1, -1, 0, 0, -1], dtype=torch.int32, device=DEVICE)
    values = (torch.randn(5, 2000, generator=gen) * 0.1).to(DEVICE, dtype)
    values[slots < 0] = float("nan")
    added = gate_up.clone()
    added[slots >= 0] += values[slots >= 0]
    assert torch.equal(silu_and_mul(gate_up, delta=(values, slots)), silu_and_mul(added))
    assert torch.equal(silu_and_mul_ref(gate_up, delta=(values, slots)), silu_and_mul_ref(added))


def test_leading_dims_and_no_tokens():
    gen = torch.Generator().manual_seed(1)
    gate_up = torch.randn(2, 3, 2 * 200, generator=gen).to(DEVICE, torch.bfloat16)
    out = silu_and_mul(gate_up)
    assert out.shape == (2, 3, 200)
    assert_matches_reference(out, silu_and_mul_ref(gate_up))
    assert silu_and_mul(torch.empty(0, 64, device=DEVICE)).shape == (0, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.inference_mode()
def test_reference_equals_the_old_mlp_code(dtype):
    from pagetron.backend.model.model_config import ModelConfig

    fields = dict.fromkeys(ModelConfig.__dataclass_fields__)
    fields.update(hidden_size=64, intermediate_size=144)
    mlp = LlamaMLP(ModelConfig(**fields))
    gen = torch.Generator().manual_seed(2)
    for param in mlp.parameters():
        param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    mlp = mlp.to(dtype)
    x = torch.randn(7, 64, generator=gen).to(dtype)
    gate_up = mlp.gate_up_proj(x)
    gate, up = gate_up.split(144, dim=-1)  # LlamaMLP.forward before the kernels (frozen copy)
    expected = torch.nn.functional.silu(gate) * up
    assert torch.equal(silu_and_mul_ref(gate_up), expected)
    out, delta = mlp(x)
    assert mlp.ops is TORCH_OPS and delta is None and torch.equal(out, mlp.down_proj(expected))


# ---- CUDA only: the Llama-2-13B MLP shape, graph capture ----


@needs_cuda
def test_cuda_llama2_13b_shape_matches_reference():
    import triton.testing

    gen = torch.Generator().manual_seed(3)
    num_tokens, size = 8192, 13824
    gate_up = (torch.randn(num_tokens, 2 * size, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    out = silu_and_mul(gate_up)
    ref = silu_and_mul_ref(gate_up)
    assert_matches_reference(out, ref)
    mismatches = (out != ref).float().mean().item()

    kernel_ms = triton.testing.do_bench(lambda: silu_and_mul(gate_up))
    ref_ms = triton.testing.do_bench(lambda: silu_and_mul_ref(gate_up))
    tbytes = 3 * num_tokens * size * gate_up.element_size() / 1e12  # read gate and up, write the product
    print(
        f"\nsilu_and_mul [{num_tokens}, 2 x {size}] bf16: {mismatches:.1e} of outputs off torch's; "
        f"triton {kernel_ms:.3f} ms ({tbytes / kernel_ms * 1e3:.1f} TB/s), torch {ref_ms:.3f} ms "
        f"({ref_ms / kernel_ms:.1f}x)"
    )


@needs_cuda
def test_cuda_graph_capture():
    gen = torch.Generator().manual_seed(4)
    gate_up = random_gate_up(170, 13824, torch.bfloat16, gen)
    out = silu_and_mul(gate_up)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = silu_and_mul(gate_up)
    gate_up.copy_(torch.randn_like(gate_up))
    graph.replay()
    assert_matches_reference(out, silu_and_mul_ref(gate_up))
