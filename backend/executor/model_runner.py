"""Runs one step on the worker's model: inputs -> forward (a CUDA graph when one fits) -> sampled tokens."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pagetron.backend.core.sequence import Sequence
from pagetron.backend.core.step import GrammarMask, RunnerOutput, SchedulerOutput
from pagetron.backend.executor.cuda_graphs import DecodeGraphs
from pagetron.backend.executor.step_inputs import HostStepInputs, StepInputBuilder, StepInputs
from pagetron.backend.model.host_copy import to_device
from pagetron.backend.model.llama import LlamaForCausalLM
from pagetron.backend.model.lora import LoRAManager
from pagetron.backend.model.sampler import SampledTokens, Sampler


@dataclass
class PhaseTimes:
    """Host wall time of each phase (prepare inputs, forward, sample: LM head and sampler) of the steps
    run since it was attached, for profiling. With ``sync`` the device is synchronized around each phase,
    so device time lands in the phase that queued it."""

    sync: bool = False
    steps: list[dict[str, float]] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        sampler: Sampler,
        block_size: int,
        device: torch.device,
        graphs: DecodeGraphs | None = None,
        lora: LoRAManager | None = None,
    ):
        self.model, self.sampler, self.graphs, self.device = model, sampler, graphs, device
        self.lora = lora
        self.inputs = StepInputBuilder(block_size, device)
        self.phase_times: PhaseTimes | None = None  # set to profile each step's phases
        # the last step's sampled sequences and their samples on the device: the next step's pending input
        # tokens (asynchronous scheduling)
        self._last_sampled: tuple[list[Sequence], torch.Tensor] | None = None

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """One step on a single rank: inputs from the scheduler's output, forward, sample."""
        return self.launch(out).result()

    def launch(self, out: SchedulerOutput) -> StepResult:
        """Queues the step's work without waiting for the device; ``result()`` waits. Input tokens still
        pending (sampled by the previous step, whose result the scheduler has not seen) are taken from that
        step's samples on the device.

        NOTE on constrained rows that run ahead: their grammar masks need the previous step's tokens, which
        the scheduler applies after this launch. Such a step queues its forward pass and LM head now and its
        sampling when ``sample()`` is called (the engine does, once it has applied the previous step), so
        the device computes the forward pass while the host updates the grammars and fills the masks."""
        self.sampler.forget(out.finished_seq_ids)
        if not out:
            return StepResult(None)
        timer = _Timer(self.phase_times, self.device)
        host = timer.phase("prepare", self.inputs.build, out)
        if self.lora is not None:
            self.lora.prepare(out)
        seqs = out.sampled_seqs
        if out.grammar is not None and any(seqs[row].num_pending_tokens > 1 for row in out.grammar.rows):
            logits = self._logits(host, timer)
            before = self.sampler.outputs_before(seqs)  # counted now, before the next step is scheduled
            return StepResult(None, lambda: self._sample_later(logits, seqs, out.grammar, timer, before))
        return StepResult(self._remember(seqs, self.run(host, seqs, timer, out.grammar)))

    @torch.inference_mode()
    def _sample_later(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        grammar: GrammarMask,
        timer: _Timer,
        outputs_before: list[int] | None,
    ) -> SampledTokens:
        sample = self.sampler.sample
        sampled = timer.done(timer.phase("sample", sample, logits, seqs, grammar, outputs_before))
        return self._remember(seqs, sampled)

    def _remember(self, seqs: list[Sequence], sampled: SampledTokens | None) -> SampledTokens | None:
        """Keeps the samples on the device: the next step's pending input tokens."""
        self._last_sampled = (seqs, sampled.token_ids) if sampled is not None else None
        return sampled

    @torch.inference_mode()
    def run(
        self,
        host: HostStepInputs,
        sampled_seqs: list[Sequence] | None,
        timer: _Timer | None = None,
        grammar: GrammarMask | None = None,
    ) -> SampledTokens | None:
        """Forward over ``host`` inputs; with tensor parallelism every rank runs this, and rank 0 (the one
        with ``sampled_seqs`` and the grammar masks) gets the logits and samples."""
        timer = timer or _Timer(self.phase_times, self.device)
        logits = self._logits(host, timer)
        if logits is None:
            return timer.done(None)
        return timer.done(timer.phase("sample", self.sampler.sample, logits, sampled_seqs, grammar))

    @torch.inference_mode()
    def _logits(self, host: HostStepInputs, timer: _Timer) -> torch.Tensor | None:
        """The forward pass and the LM head on the rows to sample: logits on rank 0 (gathered there), None on
        the other ranks or when no row is sampled."""
        inputs = timer.phase("prepare", self._to_device, host)
        hidden = timer.phase("forward", self._forward, inputs)
        if not host.shape.num_sampled:
            return None
        return timer.phase("sample", self.model.compute_logits, hidden[inputs.sample_rows])

    def _to_device(self, host: HostStepInputs) -> StepInputs:
        inputs = self.inputs.to_device(host)
        if host.pending:
            seqs, previous = self._last_sampled  # only the step just before can leave a token pending
            rows = {seq.seq_id: row for row, seq in enumerate(seqs)}
            dst = to_device([row for row, _ in host.pending], self.device)
            src = to_device([rows[seq_id] for _, seq_id in host.pending], self.device)
            inputs.input_ids[dst] = previous[src]
        return inputs

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        meta = inputs.meta
        if (
            self.graphs is not None
            and inputs.is_decode_only
            and meta.num_decode_tokens <= self.graphs.max_batch
        ):
            return self.graphs.run(inputs.input_ids, inputs.positions, meta)
        return self.model(inputs.input_ids, inputs.positions, meta)


class StepResult:
    """A launched step: ``sample()`` queues its sampling if launch deferred it; ``result()`` (which samples
    first if that is still to do) waits for its samples to reach the host (once)."""

    def __init__(self, sampled: SampledTokens | None, deferred: Callable[[], SampledTokens] | None = None):
        self._sampled, self._deferred = sampled, deferred
        self._output: RunnerOutput | None = None

    def sample(self) -> None:
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            self._sampled = deferred()

    def result(self) -> RunnerOutput:
        self.sample()
        if self._output is None:
            self._output = self._sampled.output() if self._sampled is not None else RunnerOutput()
        return self._output


class _Timer:
    def __init__(self, times: PhaseTimes | None, device: torch.device):
        self.times, self.device = times, device
        self.row: dict[str, float] = {}

    def phase(self, name: str, fn, *args):
        if self.times is None:
            return fn(*args)
        if name in self.row:  # prepare runs twice (host, then device): one figure
            result = self.phase(name + "_", fn, *args)
            self.row[name] += self.row.pop(name + "_")
            return result
        sync = self.times.sync and self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        result = fn(*args)
        if sync:
            torch.cuda.synchronize(self.device)
        self.row[name] = time.perf_counter() - start
        return result

    def done(self, result: SampledTokens | None) -> SampledTokens | None:
        if self.times is not None:
            self.times.steps.append(self.row)
        return result
