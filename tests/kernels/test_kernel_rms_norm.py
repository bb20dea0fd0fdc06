"""The Triton RMSNorm kernels equal their torch references, the model's fused residual stream is
bit-identical to the unfused forward it replaced, and every layer of a model runs the KernelOps it is built
with.

Without CUDA the kernels run in the Triton interpreter on small CPU shapes. The interpreter (triton 3.9)
truncates fp32 -> bf16 casts where the GPU rounds to nearest even (cvt.rn); conftest.py makes it round as
the GPU does. With CUDA the same small tests run compiled on the GPU, plus the Llama-2-13B shape (T=8192,
hidden 5120; run with ``-s`` for the timing lines) and a CUDA graph capture.

Numerics (the module docstring of pagetron.kernels.rms_norm): the residual sum is bit-exact; the output
differs from the reference only through the fp32 sum of squares and rsqrt, i.e. fp32 outputs to about
1e-7 relative and bf16 outputs bit-equal except for rare one-ulp steps.
"""

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from kernel_testing import DEVICE, for_device, needs_cuda, relative_error, triton_ops_for_device, ulp_distance
from model_factory import FULL_ONLY
from pagetron.backend.model.kernel_ops import TORCH_OPS, KernelOps, kernel_ops
from pagetron.backend.model.layers.attention import AttentionMetadata
from pagetron.backend.model.layers.norm import RMSNorm
from pagetron.backend.model.llama import LlamaForCausalLM
from pagetron.backend.model.model_config import ModelConfig
from pagetron.kernels import rms_norm as kernel_module
from pagetron.kernels.layers_ref import fused_add_rms_norm_ref, rms_norm_ref

kernel_module = for_device(kernel_module)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_lora_delta_gives_the_bits_of_adding_it_first(dtype):
    """x + delta on the rows with an adapter slot, rounded as the LoRA expand adds in place; rows of
    slot -1 hold NaN that must never be read."""
    gen = torch.Generator().manual_seed(8)
    x, residual = random_rows(6, 576, dtype, gen), random_rows(6, 576, dtype, gen)
    weight = random_weight(576, dtype, gen)
    slots = torch.tensor([0, -1, 2, -1, 1, 0], dtype=torch.int32, device=DEVICE)
    values = (torch.randn(6, 576, generator=gen) * 0.05).to(DEVICE, dtype)
    values[slots < 0] = float("nan")
    added = x.clone()
    added[slots >= 0] += values[slots >= 0]
    for fn in (fused_add_rms_norm, fused_add_rms_norm_ref):
        out, new_residual = fn(x, residual, weight, 1e-6, delta=(values, slots))
        want_out, want_residual = fn(added, residual, weight, 1e-6)
        assert torch.equal(out, want_out) and torch.equal(new_residual, want_residual)


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


# ---- the model: fused residual stream == the old forward; the ops it is built with run in every layer ----


def tiny_config(qk_norm: bool) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3" if qk_norm else "llama",
        vocab_size=96,
        hidden_size=80,  # not a power of two
        intermediate_size=144,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,  # the attention kernels' smallest
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


BLOCK_SIZE = 16  # the attention kernels' smallest
TABLES = [[1, 4], [3, 0], [5, 2]]  # sequence s -> its cache blocks


def tiny_model(
    qk_norm: bool,
    dtype: torch.dtype,
    device: str = DEVICE,
    weight_dtype: torch.dtype | None = None,
    ops: KernelOps = TORCH_OPS,
) -> LlamaForCausalLM:
    """A random 3-layer model in ``dtype`` whose weights are rounded to ``weight_dtype`` (default dtype),
    built with ``ops``; the same weights whatever the ops."""
    cfg = tiny_config(qk_norm)
    model = LlamaForCausalLM(cfg, max_position=64, ops=ops)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    model = model.to(device, weight_dtype or dtype).to(dtype).eval()
    for attn in model.attention_layers():
        shape = (6, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
        attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    return model


def prefill_batch(seq_lens: list[int], device: str = DEVICE):
    """Token ids, positions and metadata of up to three whole prompts of up to 32 tokens, sequence s in
    the blocks TABLES[s]."""
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(1, 96, (sum(seq_lens),), generator=gen).to(device)
    tables = torch.tensor(TABLES[: len(seq_lens)], dtype=torch.int32)
    token_positions = [torch.arange(n) for n in seq_lens]
    positions = torch.cat(token_positions).to(device)
    slots = torch.cat(
        [
            tables[s, p // BLOCK_SIZE].long() * BLOCK_SIZE + p % BLOCK_SIZE
            for s, p in enumerate(token_positions)
        ]
    ).to(device)
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


SEQ_LENS = [5, 21, 1]  # the second sequence spans two blocks


def recording(ops: KernelOps, calls: Counter) -> KernelOps:
    """``ops`` counting in ``calls`` how often each of its kernels runs."""

    def counted(name, kernel):
        def call(*args, **kwargs):
            calls[name] += 1
            return kernel(*args, **kwargs)

        return call

    kernels = {
        f.name: counted(f.name, getattr(ops, f.name)) for f in dataclasses.fields(ops) if f.name != "name"
    }
    return dataclasses.replace(ops, **kernels)


def calls_of_a_prefill(qk_norm: bool) -> Counter:
    """The kernels one prefill step of the tiny model runs: each of 3 layers runs its norms (the first
    layer's input norm has no residual to add yet; q/k norms with qk_norm), rotary, MLP and attention;
    then the final norm."""
    return Counter(
        rms_norm=1 + (3 * 2 if qk_norm else 0),
        fused_add_rms_norm=3 * 2 - 1 + 1,
        apply_rotary=3,
        silu_and_mul=3,
        write_kv_cache=3,
        prefill_attention=3,
    )


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
def test_torch_ops_forward_is_bit_identical_to_the_old_forward(dtype, qk_norm):
    model = tiny_model(qk_norm, dtype, device="cpu")
    assert model.ops is TORCH_OPS, "the default"
    ids, positions, meta = prefill_batch(SEQ_LENS, device="cpu")
    expected = old_logits(model, ids, positions, meta)
    got = model.compute_logits(model(ids, positions, meta))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
@torch.inference_mode()
def test_the_ops_a_model_is_built_with_reach_every_layer(qk_norm):
    calls = Counter()
    ops = recording(TORCH_OPS, calls)
    model = tiny_model(qk_norm, torch.float32, device="cpu", ops=ops)
    with_ops = [m for m in model.modules() if hasattr(m, "ops")]
    # per layer: 2 norms (+ q/k norms), rotary, MLP, attention; the final norm; the model itself
    assert len(with_ops) == 3 * (5 + 2 * qk_norm) + 2 and all(m.ops is ops for m in with_ops)
    model(*prefill_batch(SEQ_LENS, device="cpu"))
    assert calls == calls_of_a_prefill(qk_norm), "a layer ran kernels other than the model's"
    default = tiny_model(qk_norm, torch.float32, device="cpu")
    assert all(m.ops is TORCH_OPS for m in default.modules() if hasattr(m, "ops"))
    with pytest.raises(ValueError, match="kernel set must be one of"):
        kernel_ops("cuda")


@pytest.mark.parametrize(
    "dtype, qk_norm",
    [
        (torch.float32, False),
        (torch.bfloat16, True),
        pytest.param(torch.float32, True, marks=FULL_ONLY),  # the two above cover each dtype and norm
        pytest.param(torch.bfloat16, False, marks=FULL_ONLY),
    ],
    ids=["float32-llama", "bfloat16-qwen3", "float32-qwen3", "bfloat16-llama"],
)
@torch.inference_mode()
def test_triton_ops_forward_matches_torch_ops(dtype, qk_norm):
    calls = Counter()
    ids, positions, meta = prefill_batch(SEQ_LENS)
    reference = tiny_model(qk_norm, dtype)
    model = tiny_model(qk_norm, dtype, ops=recording(triton_ops_for_device(), calls))
    model.load_state_dict(reference.state_dict())  # the same weights, whatever tiny_model does
    assert reference.ops is TORCH_OPS and model.ops.name == "triton"
    expected = reference.compute_logits(reference(ids, positions, meta))
    got = model.compute_logits(model(ids, positions, meta))
    assert calls == calls_of_a_prefill(qk_norm), "every layer ran the triton kernels"
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
