"""Small host values (per-row parameters, row indices) sent to the device without waiting for it.

``torch.tensor(values, device="cuda")`` copies from pageable memory, which makes the host wait until
every kernel already queued has run: inside a step that is the whole forward pass, so the launches after
it no longer overlap the device's work (and with asynchronous scheduling the next step waits for the
previous one). Staged through pinned memory the copy is queued behind those kernels instead; the pinned
buffer is kept by torch's host allocator until the copy has run.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(values: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor if device.type == "cpu" else tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
