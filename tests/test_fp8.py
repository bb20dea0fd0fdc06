"""FP8 weights (quantization="fp8", and checkpoints stored in FP8) on the CPU path, against a reference
that rounds to e4m3 on its own (numpy, round half to even) rather than through torch's cast."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model_factory import make_hf_model
from pagetron.backend import LLM, SamplingParams
from pagetron.backend.model.quantization import FP8, fp8_linear, quantize_rows


def round_e4m3(v: np.ndarray) -> np.ndarray:
    """Nearest e4m3fn value (3 mantissa bits; normal exponents down to -6, subnormal steps of 2^-9)."""
    v = np.asarray(v, dtype=np.float64)
    exponent = np.floor(np.log2(np.maximum(np.abs(v), 2.0**-30))).clip(min=-6)
    step = 2.0 ** (exponent - 3)
    return np.clip(np.round(v / step) * step, -448, 448)  # np.round: half to even


def reference_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-12) / 448
    return round_e4m3(x / scale), scale


def test_rows_are_scaled_to_448_and_rounded_to_e4m3():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.3], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (2, 1)
    # row 0: scale 2/448; 0.3 * 224 = 67.2 -> 64 (e4m3 steps by 8 between 64 and 128)
    assert q.float().tolist() == [[224.0, -448.0, 112.0, 64.0], [0.0, 0.0, 0.0, 0.0]]
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((64, 96)) * np.exp(rng.uniform(-8, 8, (64, 1)))  # rows of any magnitude
    wide[3, :5] = [1e-9, -3e-7, 2e-5, 0.0, 5e-4]  # subnormal and zero values after scaling
    q, scale = quantize_rows(torch.tensor(wide, dtype=torch.float32))
    expected, expected_scale = reference_quantize(wide.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(scale.numpy(), expected_scale, rtol=1e-6)
    np.testing.assert_array_equal(q.float().numpy(), round_e4m3(wide.astype(np.float32) / scale.numpy()))
    np.testing.assert_allclose(q.float().numpy(), expected, rtol=0, atol=1e-6 * 448)


def test_the_fp8_product_equals_the_emulated_reference():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    w = (rng.standard_normal((48, 64)) * 0.05).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    wq, ws = quantize_rows(torch.from_numpy(w))
    y = fp8_linear(torch.from_numpy(x), wq, ws, torch.from_numpy(b)).numpy()
    xr, xs = reference_quantize(x.astype(np.float64))
    wr, wsr = reference_quantize(w.astype(np.float64))
    expected = (xr * xs) @ (wr * wsr).T + b
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + b
    assert np.abs(y - exact).max() < 0.05 * np.abs(exact).max()  # and it is still the same product


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("fp8"), "llama", num_kv_heads=2, tie_word_embeddings=False)


def first_logprobs(llm: LLM, prompts: list[list[int]]) -> np.ndarray:
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=20)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return np.array([sorted(lp.logprob for lp in o.outputs[0].logprobs[0].values()) for o in outs])


PROMPTS = [[5, 6, 7, 8], [100, 3, 44], list(range(20, 50))]
DRIFT = 0.25  # largest change of a top-20 logprob that FP8 rounding may cause here


def test_weights_quantized_at_load(tiny):
    base, fp8 = LLM(str(tiny)), LLM(str(tiny), quantization="fp8")
    linears = fp8.engine.executor.worker.model.linear_layers()
    assert len(linears) == 2 * 4  # 2 layers: qkv, o, gate_up, down
    assert all(layer.weight.dtype == FP8 for layer in linears)
    assert all(layer.weight_scale.shape == (layer.weight.shape[0], 1) for layer in linears)
    model = fp8.engine.executor.worker.model
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    # e4m3 keeps 3 mantissa bits: on this random model the top-20 logprobs move by about 0.1
    drift = np.abs(first_logprobs(fp8, PROMPTS) - first_logprobs(base, PROMPTS)).max()
    assert 0 < drift < DRIFT, drift


def make_fp8_checkpoint(folder, out, method: str) -> dict[str, torch.Tensor]:
    """``folder``'s linear weights stored in FP8: one scale per tensor ("fp8") or per row (compressed-
    tensors, channel strategy), plus the static input scales such checkpoints carry."""
    out.mkdir()
    tensors = load_file(folder / "model.safetensors")
    linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    stored = {}
    for name, w in tensors.items():
        if name.endswith(".weight") and any(f".{n}." in name for n in linear):
            amax = w.abs().amax(dim=1, keepdim=True) if method == "compressed-tensors" else w.abs().max()
            scale = (amax / 448).float()
            stored[name] = (w / scale).to(FP8)
            stored[name.replace(".weight", ".weight_scale")] = scale
            stored[name.replace(".weight", ".input_scale")] = torch.tensor(1.0)
        else:
            stored[name] = w
    save_file(stored, out / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    if method == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    else:
        weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}
        groups = {"group_0": {"weights": weights, "targets": ["Linear"]}}
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": groups,
        }
    (out / "config.json").write_text(json.dumps(config))
    return stored


@pytest.mark.parametrize("method", ["fp8", "compressed-tensors"])
def test_a_checkpoint_in_fp8_loads_as_stored(tiny, tmp_path, method):
    stored = make_fp8_checkpoint(tiny, tmp_path / "fp8", method)
    llm = LLM(str(tmp_path / "fp8"))
    qkv = llm.engine.executor.worker.model.model.layers[0].self_attn.qkv_proj
    prefix = "model.layers.0.self_attn"
    parts = [f"{prefix}.{p}_proj" for p in "qkv"]
    expected = torch.cat([stored[f"{p}.weight"] for p in parts])
    assert qkv.weight.dtype == FP8 and torch.equal(qkv.weight.view(torch.uint8), expected.view(torch.uint8))
    scales = [stored[f"{p}.weight_scale"].reshape(-1).expand(stored[f"{p}.weight"].shape[0]) for p in parts]
    assert torch.equal(qkv.weight_scale.reshape(-1), torch.cat(scales))
    # the same model with the stored weights dequantized, run in fp32: activations are the only difference
    dequantized = tmp_path / "dequantized"
    dequantized.mkdir()
    plain = {k: v for k, v in stored.items() if not k.endswith("_scale")}
    for name in [k for k in plain if f"{k[:-7]}.weight_scale" in stored]:
        plain[name] = plain[name].float() * stored[f"{name[:-7]}.weight_scale"]
    save_file(plain, dequantized / "model.safetensors")
    (dequantized / "config.json").write_text((tiny / "config.json").read_text())
    drift = np.abs(first_logprobs(llm, PROMPTS) - first_logprobs(LLM(str(dequantized)), PROMPTS)).max()
    assert 0 < drift < DRIFT, drift


def test_unsupported_quantization_is_a_clear_error(tiny, tmp_path):
    from pagetron.backend.core.config import ConfigError

    with pytest.raises(ConfigError) as e:
        LLM(str(tiny), quantization="int4")
    assert e.value.key == "quantization"
    config = json.loads((tiny / "config.json").read_text())
    for qc, words in [
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise FP8"),
        ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
    ]:
        folder = tmp_path / qc["quant_method"]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
        (folder / "model.safetensors").symlink_to(tiny / "model.safetensors")
        with pytest.raises(Exception, match=words):
            LLM(str(folder))


def test_the_agreement_benchmark_reports_its_figures(tmp_path):
    from pagetron.backend.benchmarks.fp8_agreement import agreement

    folder = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False, vocab_size=49152,
                           with_tokenizer=True)  # fmt: skip
    result = agreement(str(folder), num_prompts=3, max_tokens=6)
    assert result["prompts"] == 3 and 0 <= result["identical_answers"] <= result["mean_agreeing_prefix"] <= 1


def test_fp8_with_tensor_parallelism_quantizes_each_ranks_shard(tiny):
    """Row-parallel shards get their scales from their own input columns, so TP 2 is close to TP 1, not
    equal to it."""
    one = first_logprobs(LLM(str(tiny), quantization="fp8"), PROMPTS)
    llm = LLM(str(tiny), quantization="fp8", tensor_parallel_size=2)
    try:
        two = first_logprobs(llm, PROMPTS)
    finally:
        llm.engine.shutdown()
    assert np.abs(one - two).max() < DRIFT
