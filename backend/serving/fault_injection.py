"""Deliberate engine faults for testing readiness and recovery, switched on only by an environment variable.

PAGETRON_FAULT="raise-after:N"  every executed step after the first N raises
PAGETRON_FAULT="hang-after:N"   the step after the first N blocks forever
PAGETRON_FAULT="file:PATH"      one of the above read from PATH each time the model loads (empty: none),
                                so one server can go through several faults, reloading in between

It wraps the engine's executor (the seam the engine offers), so the engine's own failure handling runs.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from pagetron.backend.core.step import RunnerOutput, SchedulerOutput
from pagetron.backend.executor.executor import Executor, ExecutorFactory, ExecutorWrapper, default_executor
from pagetron.backend.executor.spec import ModelSpec
from pagetron.backend.serving.constants import FAULT_ENV

logger = logging.getLogger(__name__)
ENV_VAR = FAULT_ENV
KINDS = ("raise-after", "hang-after")


class FaultyExecutor(ExecutorWrapper):
    def __init__(self, inner: Executor, kind: str, after: int):
        super().__init__(inner)
        self.kind, self.after, self.steps = kind, after, 0

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self.steps += 1
        if self.steps > self.after:
            if self.kind == "raise-after":
                raise RuntimeError(f"injected fault ({ENV_VAR}={self.kind}:{self.after})")
            threading.Event().wait()
        return super().execute(scheduler_output)


def fault_injection_factory() -> ExecutorFactory | None:
    """The executor factory $PAGETRON_FAULT asks for, or None when it is unset."""
    spec = os.environ.get(ENV_VAR, "")
    if spec.startswith("file:"):
        spec = Path(spec.removeprefix("file:")).read_text().strip()
    if not spec:
        return None
    kind, _, count = spec.partition(":")
    if kind not in KINDS or not count.isdigit():
        raise ValueError(f"{ENV_VAR}={spec!r}: expected raise-after:N or hang-after:N")
    logger.warning("fault injection armed: %s", spec)

    def factory(model: ModelSpec) -> Executor:
        return FaultyExecutor(default_executor(model), kind, int(count))

    return factory
