"""The seam between the engine and whatever runs the model.

    engine.step():  scheduler.schedule() -> SchedulerOutput
                    executor.execute(SchedulerOutput) -> RunnerOutput     <- here
                    scheduler.update(SchedulerOutput, RunnerOutput) -> outputs

An executor owns one or more workers; it changes no sequence and decides nothing about scheduling. The
uniprocess executor runs one worker in the engine's process and can ``launch`` a step without waiting
for the device (asynchronous scheduling); the multi-process tensor-parallel executor runs each step
through. An engine may be given any factory ``ModelSpec -> Executor`` (tests and fault injection wrap
the default one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

from pagetron.backend.core.lora import LoRARequest
from pagetron.backend.core.step import RunnerOutput, SchedulerOutput
from pagetron.backend.executor.spec import ModelSpec
from pagetron.backend.executor.worker import Worker


class LaunchedStep(Protocol):
    def sample(self) -> None:
        """Queues the step's sampling if launch left it for later (constrained rows that ran ahead: their
        masks need the previous step's tokens, applied after this launch)."""

    def result(self) -> RunnerOutput: ...


class Finished:
    """A step that already ran to completion."""

    def __init__(self, output: RunnerOutput):
        self._output = output

    def sample(self) -> None:
        pass

    def result(self) -> RunnerOutput:
        return self._output


class Executor(ABC):
    num_kv_blocks: int  # KV-cache blocks every worker holds; the block manager hands out exactly these
    device_name: str  # where the model runs, for logs
    # launch() takes steps whose input tokens are still pending (sampled by the step before, whose result
    # the scheduler has not applied): what asynchronous scheduling needs
    supports_async: bool = False
    # steps run on a device apart from the host (CUDA), so scheduling ahead overlaps host and device work
    overlaps_host: bool = False

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput: ...

    def launch(self, scheduler_output: SchedulerOutput) -> LaunchedStep:
        """Queues a step and returns without waiting for it where the executor can; by default it runs."""
        return Finished(self.execute(scheduler_output))

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Loads a LoRA adapter on the host (checked against the model); ValueError if it does not fit."""
        raise ValueError("this executor does not run LoRA adapters")

    def num_resident_loras(self) -> int:
        """LoRA adapters in device slots now (any thread: a count, for metrics)."""
        return 0

    def health(self) -> str | None:
        """Why the executor can run no more steps (a worker process died), or None. Cheap and safe to call
        from any thread: a watchdog polls it so an idle engine's readiness drops too."""
        return None

    def shutdown(self) -> None:  # noqa: B027 (nothing to release in-process)
        """Releases workers; the executor is unusable afterwards."""


ExecutorFactory = Callable[[ModelSpec], Executor]


class UniprocExecutor(Executor):
    def __init__(self, spec: ModelSpec):
        self.worker = Worker(spec)
        self.worker.initialize_cache(self.worker.max_kv_blocks)
        self.num_kv_blocks = self.worker.num_kv_blocks
        self.device_name = str(self.worker.device)
        self.overlaps_host = self.worker.device.type == "cuda"

    supports_async = True

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.worker.runner.execute(scheduler_output)

    def launch(self, scheduler_output: SchedulerOutput) -> LaunchedStep:
        return self.worker.runner.launch(scheduler_output)

    def add_lora(self, lora_request: LoRARequest) -> None:
        if self.worker.lora is None:
            raise ValueError("the engine was started without enable_lora")
        self.worker.lora.add(lora_request)

    def num_resident_loras(self) -> int:
        lora = self.worker.lora
        return 0 if lora is None else sum(slot is not None for slot in lora.slots)


def default_executor(spec: ModelSpec) -> Executor:
    """One worker in this process, or with tensor_parallel_size > 1 one process per rank."""
    if spec.config.tensor_parallel_size == 1:
        return UniprocExecutor(spec)
    from pagetron.backend.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(spec)


class ExecutorWrapper(Executor):
    """Delegates to another executor; subclasses override ``execute`` to observe or alter steps."""

    def __init__(self, inner: Executor):
        self.inner = inner
        self.num_kv_blocks, self.device_name = inner.num_kv_blocks, inner.device_name
        self.overlaps_host = inner.overlaps_host

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.inner.execute(scheduler_output)

    def health(self) -> str | None:
        return self.inner.health()

    def add_lora(self, lora_request: LoRARequest) -> None:
        self.inner.add_lora(lora_request)

    def num_resident_loras(self) -> int:
        return self.inner.num_resident_loras()

    def shutdown(self) -> None:
        self.inner.shutdown()
