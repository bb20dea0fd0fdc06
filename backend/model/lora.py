"""LoRA adapters (PEFT folders) served beside the base model, many in one step (S-LoRA / Punica style).

Each LoRA-capable linear layer holds ``max_loras`` device slots of stacked, zero-padded weights; each of a
step's token rows names the slot of its request's adapter (-1: the base model), and adds its low-rank
product to the base output:

    slots:  A [max_loras, P R, in]   B [max_loras, out, R]   (R = max_lora_rank, P fused parts such as
                                                             q|k|v; B carries the scaling)
    step:   rows         [ d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ]   adapters: d0, p0 -> a; d2, p1 -> b; d1 none
            token_slots  [  0 -1  1 |  0  0  0  0 |  1  1 ]   (a in slot 0, b in slot 1)
            y[i] += (x[i] @ A[slot_i]^T) @ B[slot_i]^T       per part, for every row with a slot

With tensor parallelism B is cut like its layer's output (column-parallel) and A like its input
(row-parallel, where each rank's partial product joins the layer's all-reduce: the sum over ranks of
x_r A_r^T B^T is x A^T B^T). Adapters live on the host too (``max_cpu_loras``, LRU), and a slot is given
to the least recently used adapter that the step does not need.

The product is pagetron.kernels.lora (OpenAI-Triton, Punica's SGMV: the rows grouped by slot once per
step, then one launch per shrink and per expand of a layer, whatever the mix of adapters) or, with the
torch kernels (the CPU), pagetron.kernels.lora_torch (the same grouping on the host, one bmm for all
slots), chosen once with the model's kernels. On a GPU the slot of each row is a device tensor and the
grouping runs on the device, so decode CUDA graphs capture the LoRA path too (their padding rows have
slot -1).
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pagetron.backend.core.lora import LoRARequest
from pagetron.backend.core.step import SchedulerOutput
from pagetron.backend.model.host_copy import to_device
from pagetron.backend.model.llama import PROJECTIONS, projection_shapes

TARGETS = PROJECTIONS  # PEFT names its target modules as HF does


class LoRAError(ValueError):
    pass


WORKSPACE_MAX_ROWS = 1024  # steps up to this many rows share one zeroed shrink workspace (decode) ...
WORKSPACE_MAX_BYTES = 64 << 20  # ... when it fits in this (high ranks on deep models zero per layer)


class LoRAContext:
    """Shared by every LoRA-capable layer: the current step's slot per token row (None: no row uses an
    adapter) and the shrink / expand implementations (kernels or their torch form), which take the rows as
    ``group`` makes them from the slots: once per forward pass, by the first layer that needs them (inside
    a CUDA graph's capture, so replays regroup the rows they are given).

    NOTE: the shrink adds its K ranges' partial sums into a zeroed fp32 buffer. A step of at most
    WORKSPACE_MAX_ROWS rows (and WORKSPACE_MAX_BYTES) zeroes one workspace for every layer at once, each
    layer's shrink writing its own columns (registered when LoRA is enabled), instead of one zero-fill
    launch per layer (128 for the 8B shape's 32 layers x 4 projections); longer steps, whose launches
    count for little beside their GEMMs, zero each layer's buffer as they go, keeping the workspace
    small::

        workspace [T, sum of P R]:  [ L0 qkv (3R) | L0 o (R) | L0 gate_up (2R) | L0 down (R) | L1 qkv ... ]
    """

    def __init__(
        self,
        shrink: Callable[..., torch.Tensor],
        expand: Callable[..., torch.Tensor],
        group: Callable[[torch.Tensor, int], Any],
        num_slots: int,
        side_stream: Any = None,
        expand_silu_and_mul: Callable[..., torch.Tensor] | None = None,
    ):
        self.shrink, self.expand, self.group, self.num_slots = shrink, expand, group, num_slots
        self.side_stream = side_stream  # a torch.cuda.Stream for LoRA beside the base GEMMs, or None
        self._held: list[torch.Tensor] = []  # buffers the side stream still writes, until join()
        # set around a graph's warm-up pass: it takes the path the capture will, so every kernel the
        # capture launches is compiled before it (Triton compiling inside a capture is not safe)
        self.as_captured = False
        self._expand_silu_and_mul = expand_silu_and_mul  # the kernels' fused gate|up expand (see fuses_silu)
        self._token_slots: torch.Tensor | None = None
        self._rows: Any = None
        self._all_rows: Any = None
        self._width = 0  # columns of the workspace, over every registered layer
        self._workspace: torch.Tensor | None = None

    def register(self, width: int) -> int:
        """A layer's ``width`` columns of the shrink workspace; returns their offset."""
        offset, self._width = self._width, self._width + width
        return offset

    def shrink_out(self, offset: int, width: int) -> torch.Tensor | None:
        """The zeroed workspace columns of the layer at ``offset`` this step, or None (zero its own)."""
        if self._workspace is None:
            return None
        return self._workspace[:, offset : offset + width]

    def _shrink_buffer(self, x: torch.Tensor, a: torch.Tensor, offset: int) -> torch.Tensor:
        """Where the shrink of x by a writes: the layer's workspace columns, or a zeroed fp32 buffer."""
        out = self.shrink_out(offset, a.shape[1])
        if out is None:
            out = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
        return out

    @property
    def token_slots(self) -> torch.Tensor | None:
        return self._token_slots

    @token_slots.setter
    def token_slots(self, token_slots: torch.Tensor | None) -> None:
        self._token_slots, self._rows, self._all_rows = token_slots, None, None

    def regroup(self) -> None:
        """The next pass groups the rows again (a graph capture after its warm-up pass)."""
        self._rows = self._all_rows = None

    # NOTE: a layer's shrink reads only its input, so it can run while the base GEMM does: while a decode
    # CUDA graph is captured, each shrink goes to a side stream that first waits for the main one (the
    # input is ready), and the expand, on the main stream, waits for the side stream (t is ready). The
    # two streams become two branches of the graph, so the shrink's launch and latency hide behind the
    # base GEMM, leaving one LoRA kernel a projection on the step's critical path (eager steps, prefill
    # among them, keep the shrink in line: there the two event calls per layer would cost host time)::
    #
    #     main:  rows, zero ─┬─ base GEMM ──────────┬─ expand (y += t B) ── next layer ...
    #     side:              └─ shrink (t = x A) ───┘
    #
    # A layer whose output goes straight into a fused kernel (o_proj and down_proj into the next add-norm,
    # gate_up_proj into silu_and_mul) takes its expand off the main stream too: the side stream writes
    # the product as a delta and that kernel adds it, rounding as the expand's add in place would, so
    # the main stream runs no LoRA kernel for those layers at all (row-parallel layers only with one
    # rank: with more, each rank's delta must join the all-reduce). qkv_proj's output goes to rotary and
    # the KV cache, so its expand stays in line::
    #
    #     main:  ─┬─ base GEMM ──────────────────────────────────┬─ add-norm / silu_and_mul (y + delta)
    #     side:   └─ shrink (t = x A) ── expand (delta = t B) ───┘
    #
    # Every buffer the side stream touches is allocated on the main stream before it forks and read there
    # after it joins, so the caching allocator never hands one to another kernel too early.
    def start_shrink(self, x: torch.Tensor, a: torch.Tensor, offset: int) -> torch.Tensor:
        """t = x A^T for the current rows (fp32), into the layer's workspace columns at ``offset`` (or a
        zeroed buffer of its own); on the side stream while a graph is captured (``expand_into`` joins
        it)."""
        rows = self.rows()
        out = self._shrink_buffer(x, a, offset)
        if not self._beside():
            return self.shrink(x, a, rows, out)
        self.side_stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.side_stream):
            self.shrink(x, a, rows, out)
        return out

    def expand_into(self, t: torch.Tensor, b: torch.Tensor, y: torch.Tensor, part_starts: list[int]):
        """y += t B^T per part for the current rows (``start_shrink`` made t); returns y."""
        if self._beside():
            torch.cuda.current_stream(y.device).wait_stream(self.side_stream)
        return self.expand(t, b, self.rows(), y, part_starts)

    # NOTE: where no side stream runs beside (eager steps, prefill among them), gate_up_proj's expand is
    # fused into the SiLU-and-mul that reads its output anyway (kernels/lora.py), so the expansion of a
    # long step is never written and read back: for a prefill chunk of 8,192 rows that is 0.94 GB a
    # layer of the 8B shape's gate|up output, more than the other three LoRA layers move together. That
    # kernel groups every row, those without an adapter too (``all_rows``).
    def fuses_silu(self) -> bool:
        """Whether gate_up_proj fuses its expand into the SiLU-and-mul this pass (``expand_silu_and_mul``)."""
        return self._expand_silu_and_mul is not None and not self._beside()

    def expand_silu_and_mul(self, gate_up: torch.Tensor, t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of gate_up [T, 2 I] plus its expansion of t through b, for the current rows."""
        if self._all_rows is None:
            self._all_rows = self.group(self._token_slots + 1, self.num_slots + 1)
        return self._expand_silu_and_mul(gate_up, t, b, self._all_rows)

    def defers(self) -> bool:
        """Whether layers leave their delta to the next kernel this pass (see start_delta)."""
        return self._beside()

    def start_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offset: int, part_starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Starts the whole product on the side stream, written as a delta: (values [T, N] in x's dtype,
        the rows' slots); the caller runs its base GEMM, then ``join``s before the delta is read."""
        rows = self.rows()
        t = self._shrink_buffer(x, a, offset)
        values = torch.empty(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
        if self.side_stream is not None:  # (without one, in line: the CPU tests of the deferred path)
            self.side_stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.side_stream):
            self.shrink(x, a, rows, t)
            self.expand(t, b, rows, values, part_starts, accumulate=False)
        self._held.append(t)  # a buffer of its own (no workspace) must outlive the side stream's writes
        return values, self._token_slots

    def join(self, y: torch.Tensor) -> None:
        """The main stream waits for the side stream's work (start_delta's)."""
        if self.side_stream is not None:
            torch.cuda.current_stream(y.device).wait_stream(self.side_stream)
        self._held.clear()

    def _beside(self) -> bool:
        if self.side_stream is None:
            return False
        return self.as_captured or torch.cuda.is_current_stream_capturing()

    def rows(self) -> Any:
        if self._rows is None:
            slots = self._token_slots
            self._rows = self.group(slots, self.num_slots)
            num_rows, self._workspace = slots.shape[0], None
            if num_rows <= WORKSPACE_MAX_ROWS and 4 * num_rows * self._width <= WORKSPACE_MAX_BYTES:
                self._workspace = torch.zeros(num_rows, self._width, dtype=torch.float32, device=slots.device)
        return self._rows


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
        kernels: str = "torch",
    ):
        self.model, self.max_loras, self.max_rank, self.max_cpu_loras = (
            model,
            max_loras,
            max_rank,
            max_cpu_loras,
        )
        if kernels == "triton":
            from pagetron.kernels.lora import group_rows, lora_expand, lora_expand_silu_and_mul, lora_shrink

            side = torch.cuda.Stream(device) if device.type == "cuda" else None
            self.context = LoRAContext(
                lora_shrink, lora_expand, group_rows, max_loras, side, lora_expand_silu_and_mul
            )
        else:
            from pagetron.kernels.lora_torch import group_slots, lora_expand_torch, lora_shrink_torch

            self.context = LoRAContext(lora_shrink_torch, lora_expand_torch, group_slots, max_loras)
        self.layers = model.model.layers
        for layer in self.layers:
            for module_name in dict.fromkeys(m for m, _ in TARGETS.values()):  # in layer order
                module = layer.get_submodule(module_name)
                module.enable_lora(self.context, max_loras, max_rank, device, dtype)
        self.shapes = projection_shapes(model.cfg)
        self.device = device
        self.host: OrderedDict[int, Adapter] = OrderedDict()  # lora_int_id -> adapter, least recent first
        self._host_lock = threading.Lock()
        self.slots: list[int | None] = [None] * max_loras  # lora_int_id resident in each slot
        # with tensor parallelism, the driver notes each (slot, adapter) it loads since take_slot_loads()
        # last ran: what the other ranks must load to mirror it
        self.record_slot_loads = False
        self._slot_loads: list[tuple[int, LoRARequest]] = []
        self.token_slots: list[int] = []  # the last prepared step's slot per token row (host copy)
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
        """Puts the step's adapters in slots and sets each token row's slot; False if no row uses one."""
        requests = {seq.lora.lora_int_id: seq.lora for seq in out.seqs if seq.lora is not None}
        self.token_slots = []
        if not requests:
            self.context.token_slots = None
            return False
        slots = self._assign(requests)
        token_slots: list[int] = []
        for seq, n in zip(out.seqs, out.num_new_tokens):
            token_slots += [-1 if seq.lora is None else slots[seq.lora.lora_int_id]] * n
        self.token_slots = token_slots
        self.context.token_slots = to_device(token_slots, self.device, torch.int32)
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

    def take_slot_loads(self) -> list[tuple[int, LoRARequest]]:
        loads, self._slot_loads = self._slot_loads, []
        return loads

    def mirror(self, loads: list[tuple[int, LoRARequest]], token_slots: list[int]) -> None:
        """A tensor-parallel rank's step: the driver's slot loads, then its rows' slots."""
        for slot, request in loads:
            self._load_slot(slot, self.add(request))
        self.context.token_slots = to_device(token_slots, self.device, torch.int32) if token_slots else None

    def _load_slot(self, slot: int, adapter: Adapter) -> None:
        for index, layer in enumerate(self.layers):
            for peft_name, (module_name, part) in TARGETS.items():
                ab = adapter.weights.get((index, peft_name))
                layer.get_submodule(module_name).load_lora(
                    slot, part, *(ab if ab is not None else (None, None))
                )
        self.slots[slot] = adapter.request.lora_int_id
        if self.record_slot_loads:
            self._slot_loads.append((slot, adapter.request))
