"""The Triton RMSNorm kernels equal their torch references, and the model's fused residual stream is
bit-identical to the unfused forward it replaced.

Without CUDA the kernels run in the Triton interpreter on small CPU shapes. The interpreter (triton 3.9)
truncates fp32 -> bf16 casts where the GPU rounds to nearest even (cvt.rn), so these tests replace that one
conversion with torch's. With CUDA the same small tests run compiled on the GPU, plus the Llama-2-13B
shape (T=8192, hidden 5120; run with ``-s`` for the timing lines) and a CUDA graph capture.

Numerics (the module docstring of pagetron.kernels.rms_norm): the residual sum is bit-exact; the output
differs from the reference only through the fp32 sum of squares and rsqrt, i.e. fp32 outputs to about
1e-7 relative and bf16 outputs bit-equal except for rare one-ulp steps.
"""

import importlib.util
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on the CPU

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from kernel_testing import (  # noqa: E402, F401 (two are autouse fixtures)
    compiled_copy,
    compiled_if_cuda,
    interpreter_bf16_rounding,
    no_interpreter_while_compiling,
    relative_error,
    ulp_distance,
)
from pagetron.backend.model.layers.attention import AttentionMetadata  # noqa: E402
from pagetron.backend.model.layers.norm import RMSNorm  # noqa: E402
from pagetron.backend.model.llama import LlamaForCausalLM  # noqa: E402
from pagetron.backend.model.model_config import ModelConfig  # noqa: E402
from pagetron.kernels import rms_norm as kernel_module  # noqa: E402
from pagetron.kernels.layers_ref import fused_add_rms_norm_ref, rms_norm_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
KERNEL_MODULES = ("rms_norm", "silu_and_mul", "rotary_embedding")


kernel_module = compiled_if_cuda(kernel_module, "_rms_norm_kernel")
rms_norm, fused_add_rms_norm = kernel_module.rms_norm, kernel_module.fused_add_rms_norm


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not out.isnan().any(), "an output element was never written"
    if out.dtype == torch.float32:
        assert relative_error(out, ref) < 1e-6
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:  # one rounding moved by an fp32 ulp of the scale: rare, and one step (two after the weight)
        assert relative_error(out, ref) < 1e-2
        assert ulp_distance(out, ref).max() <= 2
        assert (out != ref).float().mean() < 1e-3


def random_rows(num_rows, hidden, dtype, gen, pad=5):
    """Random rows (no zeros) as a view with a row stride larger than hidden."""
    wide = torch.randn(num_rows, hidden + 2 * pad, generator=gen) * 3
    return wide.to(DEVICE, dtype)[:, pad : pad + hidden]


def random_weight(hidden, dtype, gen):
    return (1.0 + 0.2 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN_SIZES = [64, 576, 1000, 5120]  # powers of two and not, up to Llama-2-13B's


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_reference(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = random_rows(7, hidden, dtype, gen)
    weight = random_weight(hidden, dtype, gen)
    x_before = x.clone()
    out = torch.full((7, hidden), float("nan"), dtype=dtype, device=DEVICE)
    assert rms_norm(x, weight, 1e-5, out=out) is out
    assert_matches_reference(out, rms_norm_ref(x, weight, 1e-5))
    new = rms_norm(x, weight, 1e-5)
    assert new.is_contiguous() and torch.equal(new, out)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_rms_norm_matches_reference(dtype, hidden):
    gen = torch.Generator().manual_seed(100 + hidden)
    x, residual = random_rows(9, hidden, dtype, gen), random_rows(9, hidden, dtype, gen, pad=2)
    weight = random_weight(hidden, dtype, gen)
    inputs = (x.clone(), residual.clone())
    ref_out, ref_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    out = torch.full((9, hidden), float("nan"), dtype=dtype, device=DEVICE)
    residual_out = torch.full_like(out, float("nan"))
    got_out, got_residual = fused_add_rms_norm(x, residual, weight, 1e-6, out=out, residual_out=residual_out)
    assert got_out is out and got_residual is residual_out
    assert torch.equal(residual_out, ref_residual), "the residual sum is torch's add, bit for bit"
    assert_matches_reference(out, ref_out)
    assert torch.equal(x, inputs[0]) and torch.equal(residual, inputs[1]), "inputs must be left alone"
    # the defaults: two new contiguous tensors with the same values
    new_out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    assert new_out.is_contiguous() and new_residual.is_contiguous()
    assert torch.equal(new_out, out) and torch.equal(new_residual, residual_out)


def test_fused_add_rms_norm_in_place_residual():
    """residual_out=residual is vLLM's in-place update: the same values, written over the residual."""
    gen = torch.Generator().manual_seed(3)
    x, residual = random_rows(6, 576, torch.bfloat16, gen), random_rows(6, 576, torch.bfloat16, gen)
    weight = random_weight(576, torch.bfloat16, gen)
    wide_before = residual._base.clone()
    ref_out, ref_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6, residual_out=residual)
    assert new_residual is residual and torch.equal(residual, ref_residual)
    assert_matches_reference(out, ref_out)
    untouched = torch.ones_like(wide_before, dtype=torch.bool)
    untouched[:, 5:-5] = False
    assert torch.equal(residual._base[untouched], wide_before[untouched]), "only the view is written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_head_norm_of_a_qkv_view(dtype):
    """Qwen3's q_norm: [T, H, D] rows of a view into the fused qkv output (token and head strides)."""
    gen = torch.Generator().manual_seed(4)
    num_tokens, heads, head_dim = 5, 6, 48
    qkv = (torch.randn(num_tokens, (heads + 4) * head_dim, generator=gen) * 2).to(DEVICE, dtype)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    weight = random_weight(head_dim, dtype, gen)
    out = rms_norm(q, weight, 1e-6)
    assert out.shape == q.shape and out.is_contiguous()
    assert_matches_reference(out, rms_norm_ref(q, weight, 1e-6))


def test_fp32_weight_with_bf16_rows_promotes_like_torch():
    gen = torch.Generator().manual_seed(5)
    x = random_rows(4, 1000, torch.bfloat16, gen)
    weight = random_weight(1000, torch.float32, gen)
    out = rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.float32
    ref = rms_norm_ref(x, weight, 1e-5)
    # the bf16-rounded normalised row times an fp32 weight: equal but where that rounding moved a step
    assert not out.isnan().any() and (out != ref).float().mean() < 1e-3
    assert relative_error(out, ref) < 1e-3


def test_no_tokens():
    weight = torch.ones(64, device=DEVICE)
    x = torch.empty(0, 64, device=DEVICE)
    assert rms_norm(x, weight, 1e-6).shape == (0, 64)
    out, residual = fused_add_rms_norm(x, x, weight, 1e-6)
    assert out.shape == residual.shape == (0, 64)


# ---- the torch references are the code they replaced ----


def old_rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm.forward before the kernels (frozen copy)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_references_equal_the_old_layer_code(dtype):
    gen = torch.Generator().manual_seed(6)
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.2 * torch.randn(576, generator=gen))
    norm = norm.to(dtype)
    x, residual = (torch.randn(8, 576, generator=gen).to(dtype) for _ in range(2))
    with torch.no_grad():
        expected = old_rms_norm(norm, x)
        assert torch.equal(rms_norm_ref(x, norm.weight, norm.eps), expected)
        assert torch.equal(norm(x), expected)
        stream = residual + x  # the old decoder layer's `x = x + sublayer(...)`
        out, new_residual = norm(x, residual)
        assert torch.equal(new_residual, stream) and torch.equal(out, old_rms_norm(norm, stream))


# ---- the model: fused residual stream == the old forward; the triton backend is wired right ----


def tiny_config(qk_norm: bool) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3" if qk_norm else "llama",
        vocab_size=96,
        hidden_size=80,  # not a power of two
        intermediate_size=144,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=qk_norm,
        qk_norm=qk_norm,
        sliding_window=None,
        eos_token_ids=(0,),
    )


def tiny_model(
    qk_norm: bool, dtype: torch.dtype, device: str = DEVICE, weight_dtype: torch.dtype | None = None
) -> LlamaForCausalLM:
    """A random 3-layer model in ``dtype`` whose weights are rounded to ``weight_dtype`` (default dtype)."""
    cfg = tiny_config(qk_norm)
    model = LlamaForCausalLM(cfg, max_position=64)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    model = model.to(device, weight_dtype or dtype).to(dtype).eval()
    for attn in model.attention_layers():
        attn.k_cache = torch.zeros(12, 4, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    return model


def prefill_batch(seq_lens: list[int], device: str = DEVICE):
    """Token ids, positions and metadata of up to three whole prompts of up to 16 tokens, in blocks of 4
    tokens (block i of sequence s is block 4 * s + i)."""
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(1, 96, (sum(seq_lens),), generator=gen).to(device)
    positions = torch.cat([torch.arange(n) for n in seq_lens]).to(device)
    slots = torch.cat([16 * s + torch.arange(n) for s, n in enumerate(seq_lens)]).to(device)
    tables = torch.tensor([[4 * s + i for i in range(4)] for s in range(len(seq_lens))], dtype=torch.int32)
    starts = np.cumsum([0, *seq_lens]).tolist()
    empty = torch.zeros(0, 0, dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=slots,
        num_decode_tokens=0,
        decode_block_tables=empty,
        decode_context_lens=torch.zeros(0, dtype=torch.int32, device=device),
        prefill_block_tables=tables.to(device),
        prefill_query_start_loc=starts,
        prefill_seq_lens=list(seq_lens),
        prefill_query_start_loc_t=torch.tensor(starts, dtype=torch.int32, device=device),
        prefill_seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_prefill_query_len=max(seq_lens),
    )
    return ids, positions, meta


def _old_rotary(rotary, positions, q, k):
    cos = rotary.cos_cache[positions].unsqueeze(1).to(q.dtype)
    sin = rotary.sin_cache[positions].unsqueeze(1).to(q.dtype)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _old_attention(a, positions, x, meta):
    q, k, v = a.qkv_proj(x).split([a.q_size, a.kv_size, a.kv_size], dim=-1)
    q = q.view(-1, a.num_heads, a.head_dim)
    k = k.view(-1, a.num_kv_heads, a.head_dim)
    v = v.view(-1, a.num_kv_heads, a.head_dim)
    if a.q_norm is not None:
        q, k = old_rms_norm(a.q_norm, q), old_rms_norm(a.k_norm, k)
    q, k = _old_rotary(a.rotary, positions, q, k)
    return a.o_proj(a.attn(q, k, v, meta).flatten(1))


def _old_mlp(mlp, x):
    gate, up = mlp.gate_up_proj(x).split(mlp.intermediate_size, dim=-1)
    return mlp.down_proj(torch.nn.functional.silu(gate) * up)


def old_logits(model, ids, positions, meta):
    """LlamaForCausalLM's forward before the fused residual stream and the kernels (frozen copy)."""
    x = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        x = x + _old_attention(layer.self_attn, positions, old_rms_norm(layer.input_layernorm, x), meta)
        x = x + _old_mlp(layer.mlp, old_rms_norm(layer.post_attention_layernorm, x))
    return model.compute_logits(old_rms_norm(model.model.norm, x))


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.inference_mode()
def test_torch_backend_forward_is_bit_identical_to_the_old_forward(dtype, qk_norm):
    model = tiny_model(qk_norm, dtype, device="cpu")
    model.set_kernel_backend("torch")
    ids, positions, meta = prefill_batch([5, 11, 1], device="cpu")
    expected = old_logits(model, ids, positions, meta)
    got = model.compute_logits(model(ids, positions, meta))
    assert torch.equal(got, expected)


def test_set_kernel_backend_reaches_every_layer():
    model = tiny_model(True, torch.float32, device="cpu")
    model.set_kernel_backend("triton")
    with_backend = [m for m in model.modules() if hasattr(m, "backend") and m not in model.attention_layers()]
    # per layer: 2 norms + q/k norms, rotary, MLP; and the final norm
    assert len(with_backend) == 3 * 6 + 1 and all(m.backend == "triton" for m in with_backend)
    assert all(attn.backend == "torch" for attn in model.attention_layers()), "attention is the runner's"
    with pytest.raises(ValueError, match="kernel backend"):
        model.set_kernel_backend("cuda")


def _kernel_modules_for(device):
    """The kernel modules the layers import lazily, compiled copies on CUDA if these are interpreted."""
    modules = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"pagetron.kernels.{name}")
        jitted = [v for v in vars(module).values() if isinstance(v, interpreter.InterpretedFunction)]
        modules[module.__name__] = compiled_copy(module) if device == "cuda" and jitted else module
    return modules


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.inference_mode()
def test_triton_backend_forward_matches_torch_backend(dtype, qk_norm, monkeypatch):
    for name, module in _kernel_modules_for(DEVICE).items():
        monkeypatch.setitem(sys.modules, name, module)
    model = tiny_model(qk_norm, dtype)
    ids, positions, meta = prefill_batch([5, 11, 1])
    model.set_kernel_backend("torch")
    expected = model.compute_logits(model(ids, positions, meta))
    model.set_kernel_backend("triton")
    got = model.compute_logits(model(ids, positions, meta))
    if dtype == torch.float32:
        assert relative_error(got, expected) < 1e-5
        return
    # bf16: both paths round, differently (the rotary kernel once where the torch path rounds four
    # times), and three random layers amplify it: judge both against fp32 on the same bf16 weights
    exact = tiny_model(qk_norm, torch.float32, weight_dtype=dtype)
    exact = exact.compute_logits(exact(ids, positions, meta))
    torch_error, triton_error = relative_error(expected, exact), relative_error(got, exact)
    assert triton_error < 3e-2 and triton_error < 1.25 * torch_error, (triton_error, torch_error)


# ---- CUDA only: the Llama-2-13B shape, graph capture ----


@needs_cuda
def test_cuda_llama2_13b_shape_matches_reference():
    import triton.testing

    gen = torch.Generator().manual_seed(9)
    num_tokens, hidden = 8192, 5120
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    residual = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    weight = random_weight(hidden, torch.bfloat16, gen)
    out = rms_norm(x, weight, 1e-5)
    assert_matches_reference(out, rms_norm_ref(x, weight, 1e-5))
    ref_out, ref_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, ref_residual)
    assert_matches_reference(out, ref_out)
    mismatches = (out != ref_out).float().mean().item()

    kernel_ms = triton.testing.do_bench(lambda: fused_add_rms_norm(x, residual, weight, 1e-5))
    ref_ms = triton.testing.do_bench(lambda: fused_add_rms_norm_ref(x, residual, weight, 1e-5))
    tbytes = 4 * x.numel() * x.element_size() / 1e12  # read x and residual, write out and new residual
    print(
        f"\nfused_add_rms_norm [{num_tokens}, {hidden}] bf16: {mismatches:.1e} of outputs one step off; "
        f"triton {kernel_ms:.3f} ms ({tbytes / kernel_ms * 1e3:.1f} TB/s), torch {ref_ms:.3f} ms "
        f"({ref_ms / kernel_ms:.1f}x)"
    )


@needs_cuda
def test_cuda_graph_capture():
    gen = torch.Generator().manual_seed(10)
    x, residual = (random_rows(170, 5120, torch.bfloat16, gen) for _ in range(2))
    weight = random_weight(5120, torch.bfloat16, gen)
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    x.copy_(torch.randn_like(x))
    ref_out, ref_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    graph.replay()
    assert torch.equal(new_residual, ref_residual)
    assert_matches_reference(out, ref_out)
