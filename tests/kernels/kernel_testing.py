"""Shared helpers of the kernel tests: compiled copies of kernel modules on CUDA, the interpreter's bf16
rounding fixed to the GPU's, and error measures.

Import it after the test module has set TRITON_INTERPRET (without CUDA), before the kernel modules.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def compiled_copy(module):
    """A private copy of ``module`` whose kernels compile for the GPU (triton.jit reads TRITON_INTERPRET
    when it decorates), whatever another test module set before."""
    spec = importlib.util.find_spec(module.__name__)
    copy = importlib.util.module_from_spec(spec)
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec.loader.exec_module(copy)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return copy


def compiled_if_cuda(module, kernel_name: str):
    """``module`` itself, or on CUDA a compiled copy when another test module made its kernels interpreted."""
    if DEVICE == "cuda" and isinstance(getattr(module, kernel_name), interpreter.InterpretedFunction):
        return compiled_copy(module)
    return module


@pytest.fixture(autouse=True)
def no_interpreter_while_compiling(monkeypatch):
    if DEVICE == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _bf16_casts_round_to_nearest_even(cast_impl):
    def patched(self, src, dst_type):
        if src.dtype.scalar == interpreter.tl.float32 and dst_type.scalar == interpreter.tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return interpreter.TensorHandle(values.bfloat16().view(torch.uint16).numpy(), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    return patched


@pytest.fixture(scope="module", autouse=True)
def interpreter_bf16_rounding():
    """The interpreter (triton 3.9) truncates fp32 -> bf16 casts where the GPU rounds to nearest even:
    that one conversion is done by torch instead. Compiled kernels are left alone."""
    if DEVICE == "cuda":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        builder = interpreter.InterpreterBuilder
        mp.setattr(builder, "cast_impl", _bf16_casts_round_to_nearest_even(builder.cast_impl))
        yield


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def ulp_distance(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out - ref| in units of the last place of ref in out's dtype."""
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[out.dtype]
    ref = ref.double()
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(out.dtype).tiny)))
    return (out.double() - ref).abs() / torch.exp2(exponent - mantissa_bits)
