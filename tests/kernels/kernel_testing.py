"""What the kernel tests import by name: the device, kernel modules as that device runs them, and error
measures. The setup that must come first (TRITON_INTERPRET) and the shared fixtures are in conftest.py,
which tests cannot import from (every test folder's conftest is a module named ``conftest``).

Importing this module imports no triton, so conftest.py may import it before it sets TRITON_INTERPRET.
"""

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import pytest
import torch

from pagetron.backend.model.kernel_ops import KernelOps, triton_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
# a variant whose path another case covers: compiled on a GPU it always runs; in the (slow) interpreter
# only under `make test-full`
INTERPRETED_FULL_ONLY = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("PAGETRON_FULL_TESTS") != "1",
    reason="a repeated path in the interpreter: make test-full",
)

KERNEL_MODULES = tuple(
    f"pagetron.kernels.{name}"
    for name in (
        "kv_cache_write",
        "lora",
        "paged_decode_attention",
        "paged_prefill_attention",
        "rms_norm",
        "rotary_embedding",
        "silu_and_mul",
        "token_bitmask",
    )
)


def _interpreted(module: ModuleType) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return any(isinstance(value, InterpretedFunction) for value in vars(module).values())


def for_device(module: ModuleType) -> ModuleType:
    """The kernel module ``module`` as this device runs it: interpreted on CPU, compiled on CUDA.

    triton.jit picks one or the other when it decorates, i.e. when the module is imported. On CPU it was
    imported after conftest.py set TRITON_INTERPRET=1. On CUDA one imported under a TRITON_INTERPRET=1 that
    something else set is replaced by a private copy imported without it, whose kernels compile."""
    if DEVICE == "cpu":
        assert _interpreted(module), f"{module.__name__} was imported before TRITON_INTERPRET=1 was set"
        return module
    if not _interpreted(module):
        return module
    spec = importlib.util.find_spec(module.__name__)
    copy = importlib.util.module_from_spec(spec)
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec.loader.exec_module(copy)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return copy


def triton_ops_for_device() -> KernelOps:
    """triton_ops() over every kernel module as this device runs it (for_device); it imports them from
    sys.modules when called."""
    with pytest.MonkeyPatch.context() as mp:
        for name in KERNEL_MODULES:
            mp.setitem(sys.modules, name, for_device(importlib.import_module(name)))
        return triton_ops()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius), computed in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def ulp_distance(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out - ref| in units of the last place of ref in out's dtype."""
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[out.dtype]
    ref = ref.double()
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(out.dtype).tiny)))
    return (out.double() - ref).abs() / torch.exp2(exponent - mantissa_bits)
