"""LoRA adapters (PEFT folders) served beside the base model, many in one step (S-LoRA / Punica style).

Each LoRA-capable linear layer holds ``max_loras`` device slots of stacked, zero-padded weights; a step's
token rows are grouped by the slot of their request's adapter (the base model's rows by none), and each
group adds its low-rank product to the base output:

    slots:  A [max_loras, R, in]   B [max_loras, out, R]     (R = max_lora_rank; B carries the scaling)
    step:   rows  [ d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ]   adapters: d0, p0 -> a; d2, p1 -> b; d1 -> none
            segments  slot(a): rows 0,3,4,5,6   slot(b): rows 2,7,8
            y[rows] += (x[rows] @ A[slot]^T) @ B[slot]^T    per segment (per part of a fused q|k|v, gate|up)

With tensor parallelism B is cut like its layer's output (column-parallel) and A like its input
(row-parallel, where each rank's partial product joins the layer's all-reduce: the sum over ranks of
x_r A_r^T B^T is x A^T B^T). Adapters live on the host too (``max_cpu_loras``, LRU), and a slot is given
to the least recently used adapter that the step does not need.

NOTE: the segment loop is the torch reference (it runs on the CPU and on CUDA); a step whose rows use an
adapter runs eagerly, outside the decode CUDA graphs.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pagetron.backend.core.lora import LoRARequest
from pagetron.backend.core.step import SchedulerOutput
from pagetron.backend.model.llama import PROJECTIONS, projection_shapes

TARGETS = PROJECTIONS  # PEFT names its target modules as HF does


class LoRAError(ValueError):
    pass


@dataclass
class LoRAContext:
    """The current step's segments, shared by every LoRA-capable layer: (slot, token rows on device)."""

    segments: list[tuple[int, torch.Tensor]] = field(default_factory=list)


@dataclass
class Adapter:
    """One PEFT adapter on the host: per (layer, PEFT module) its A [r, in] and B [out, r] * scaling."""

    request: LoRARequest
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def load_adapter(
    request: LoRARequest, num_layers: int, shapes: dict[str, tuple[int, int]], max_rank: int
) -> Adapter:
    """Reads and checks a PEFT folder against the base model (``shapes``: PEFT module -> (out, in) of
    the full, unsharded weight). LoRAError names what does not fit."""
    folder = Path(request.lora_path)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise LoRAError(
                f"{path} not found (a PEFT adapter folder holds adapter_config.json and "
                "adapter_model.safetensors)"
            )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{config_path} is not valid JSON: {e}") from None
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"r must be a positive int, got {rank!r}")
    if rank > max_rank:
        raise LoRAError(f"rank {rank} is above max_lora_rank {max_rank}")
    for key, ok in [
        ("bias", config.get("bias", "none") == "none"),
        ("use_dora", not config.get("use_dora")),
        ("fan_in_fan_out", not config.get("fan_in_fan_out")),
        ("modules_to_save", not config.get("modules_to_save")),
        ("rank_pattern", not config.get("rank_pattern")),
        ("alpha_pattern", not config.get("alpha_pattern")),
    ]:
        if not ok:
            raise LoRAError(f"{key}={config.get(key)!r} is not supported")
    targets = config.get("target_modules") or []
    for target in [targets] if isinstance(targets, str) else targets:
        if target not in TARGETS and isinstance(targets, list):
            raise LoRAError(f"target module {target!r} is not supported (only {', '.join(TARGETS)})")
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    from safetensors.torch import load_file

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(weights_path).items():
        parts = name.split(".")
        for other in ("embed_tokens", "lm_head"):
            if other in parts:
                raise LoRAError(f"target module {other!r} is not supported (only {', '.join(TARGETS)})")
        try:
            layer = int(parts[parts.index("layers") + 1])
            module = next(p for p in parts if p in TARGETS)
            which = next(p for p in parts if p in ("lora_A", "lora_B"))
        except (ValueError, StopIteration):
            raise LoRAError(f"tensor {name!r} is not a LoRA weight of a decoder layer's projection") from None
        if not 0 <= layer < num_layers:
            raise LoRAError(f"tensor {name!r} is for layer {layer}; the base model has {num_layers}")
        pending.setdefault((layer, module), {})[which] = tensor
    if not pending:
        raise LoRAError(f"{weights_path} holds no LoRA weights")
    for (layer, module), ab in sorted(pending.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoRAError(f"layer {layer} {module}: lora_A and lora_B must both be present")
        a, b = ab["lora_A"], ab["lora_B"]
        out_features, in_features = shapes[module]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise LoRAError(
                f"layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the "
                f"base weight ({out_features}, {in_features}) at rank {rank}"
            )
        weights[(layer, module)] = (a, b * scaling)
    return Adapter(request, rank, weights)


class LoRAManager:
    """The adapters a worker knows: ``max_cpu_loras`` on the host, ``max_loras`` in device slots."""

    def __init__(
        self,
        model,
        max_loras: int,
        max_rank: int,
        max_cpu_loras: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.model, self.max_loras, self.max_rank, self.max_cpu_loras = (
            model,
            max_loras,
            max_rank,
            max_cpu_loras,
        )
        self.context = LoRAContext()
        self.layers = model.model.layers
        for layer in self.layers:
            for module_name in {m for m, _ in TARGETS.values()}:
                module = layer.get_submodule(module_name)
                module.enable_lora(self.context, max_loras, max_rank, device, dtype)
        self.shapes = projection_shapes(model.cfg)
        self.device = device
        self.host: OrderedDict[int, Adapter] = OrderedDict()  # lora_int_id -> adapter, least recent first
        self._host_lock = threading.Lock()
        self.slots: list[int | None] = [None] * max_loras  # lora_int_id resident in each slot
        self._slot_use: OrderedDict[int, None] = OrderedDict((s, None) for s in range(max_loras))

    def add(self, request: LoRARequest) -> Adapter:
        """The adapter on the host, loaded (and checked) if it is not there yet. Thread-safe: a server
        checks adapters on its preprocessing thread while the engine thread fills slots."""
        with self._host_lock:
            return self._add(request)

    def _add(self, request: LoRARequest) -> Adapter:
        adapter = self.host.get(request.lora_int_id)
        if adapter is not None and adapter.request != request:
            raise LoRAError(
                f"lora_int_id {request.lora_int_id} is already {adapter.request.lora_name!r} "
                f"at {adapter.request.lora_path}"
            )
        if adapter is None:
            adapter = load_adapter(request, len(self.layers), self.shapes, self.max_rank)
            self.host[request.lora_int_id] = adapter
            while len(self.host) > self.max_cpu_loras:
                self.host.popitem(last=False)
        self.host.move_to_end(request.lora_int_id)
        return adapter

    def prepare(self, out: SchedulerOutput) -> bool:
        """Puts the step's adapters in slots and its token rows into segments; False if no row uses one."""
        rows: dict[int, list[int]] = {}
        requests: dict[int, LoRARequest] = {}
        offset = 0
        for seq, n in zip(out.seqs, out.num_new_tokens):
            if seq.lora is not None:
                rows.setdefault(seq.lora.lora_int_id, []).extend(range(offset, offset + n))
                requests[seq.lora.lora_int_id] = seq.lora
            offset += n
        if not rows:
            self.context.segments = []
            return False
        slots = self._assign(requests)
        self.context.segments = [(slots[i], torch.tensor(r, device=self.device)) for i, r in rows.items()]
        return True

    def _assign(self, requests: dict[int, LoRARequest]) -> dict[int, int]:
        if len(requests) > self.max_loras:
            raise RuntimeError(f"a step uses {len(requests)} adapters; max_loras is {self.max_loras}")
        resident = {lora_id: slot for slot, lora_id in enumerate(self.slots) if lora_id is not None}
        for lora_id, request in requests.items():
            if lora_id not in resident:
                slot = next(s for s in self._slot_use if self.slots[s] not in requests)  # least recently used
                self._load_slot(slot, self.add(request))
                resident[lora_id] = slot
            self._slot_use.move_to_end(resident[lora_id])
        return {lora_id: resident[lora_id] for lora_id in requests}

    def _load_slot(self, slot: int, adapter: Adapter) -> None:
        for index, layer in enumerate(self.layers):
            for peft_name, (module_name, part) in TARGETS.items():
                ab = adapter.weights.get((index, peft_name))
                layer.get_submodule(module_name).load_lora(
                    slot, part, *(ab if ab is not None else (None, None))
                )
        self.slots[slot] = adapter.request.lora_int_id
