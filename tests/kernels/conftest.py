"""Setup of the kernel tests (the OpenAI-Triton kernels of pagetron.kernels against their torch references).

Without CUDA the kernels run in Triton's interpreter on CPU tensors. triton.jit picks interpreted or
compiled when it decorates a function: triton's own library (tl.cdiv, ...) when triton is first imported,
our kernels when their module is. So TRITON_INTERPRET=1 is set here, before anything of this folder
imports triton: pytest loads this file at its start when a path under tests/kernels is named, and
otherwise before the test modules of the folder (``pytest tests`` collects tests/kernels first). If
something imported triton earlier all the same, this file stops with an error saying so.
With CUDA the kernels compile; triton reads TRITON_INTERPRET again while compiling (at a kernel's first
call), so no test runs with it set there, and kernel_testing.for_device swaps in a compiled copy of a
kernel module that was imported interpreted.

The interpreter (triton 3.9) is made to compute what the GPU computes where it does not, one conversion at
a time (compiled kernels are left alone): fp32 -> bf16 casts, which it truncates where the GPU rounds to
nearest even (cvt.rn), and bf16 tl.dot, which multiplies the uint16 bit patterns it stores bf16 as
(triton-lang/triton#11584). Its fp32 -> fp8 conversion is fixed in test_kernel_kv_cache_write.py, the
one test module that stores fp8 through a kernel.

Helpers that tests import by name (DEVICE, needs_cuda, for_device, the error measures) are in
kernel_testing.py.
"""

import os
import sys

import numpy as np
import pytest
import torch

from kernel_testing import DEVICE


def _triton_interprets() -> bool:
    """Whether triton decorated its own library kernels (tl.cdiv, ...) for the interpreter."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.cdiv, InterpretedFunction)


if DEVICE == "cpu":
    if "triton.language" in sys.modules and not _triton_interprets():
        raise RuntimeError(
            "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1: its library "
            "kernels are compiled and cannot run on the CPU. Run with TRITON_INTERPRET=1 set, or find "
            "what imported triton first."
        )
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def no_interpreter_while_compiling(monkeypatch):
    """On CUDA, a TRITON_INTERPRET=1 left by anything else would leak into the compilation."""
    if DEVICE == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _bf16_casts_round_to_nearest_even(cast_impl):
    from triton.runtime import interpreter

    def patched(self, src, dst_type):
        if src.dtype.scalar == interpreter.tl.float32 and dst_type.scalar == interpreter.tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return interpreter.TensorHandle(values.bfloat16().view(torch.uint16).numpy(), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    return patched


def _bf16_dot_operands_as_fp32(create_dot):
    """The GPU multiplies bf16 operands exactly into fp32 accumulators: widening them to fp32 first
    reproduces that."""
    from triton.runtime import interpreter

    def widen(handle):
        if handle.dtype != interpreter.tl.bfloat16:
            return handle
        widened = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(widened, interpreter.tl.float32)

    def patched(self, a, b, acc, *args):
        return create_dot(self, widen(a), widen(b), acc, *args)

    return patched


@pytest.fixture(scope="module", autouse=True)
def interpreter_bf16_as_on_the_gpu():
    """fp32 -> bf16 casts round to nearest even, and bf16 dots multiply values (see the docstring)."""
    if DEVICE == "cuda":
        yield
        return
    from triton.runtime import interpreter

    with pytest.MonkeyPatch.context() as mp:
        builder = interpreter.InterpreterBuilder
        mp.setattr(builder, "cast_impl", _bf16_casts_round_to_nearest_even(builder.cast_impl))
        mp.setattr(builder, "create_dot", _bf16_dot_operands_as_fp32(builder.create_dot))
        yield
