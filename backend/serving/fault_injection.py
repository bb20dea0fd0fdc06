"""Deliberate engine faults for testing readiness and recovery, switched on only by an environment variable.

PAGETRON_FAULT="raise-after:N"  the engine step raises once N steps have run (and every step after that)
PAGETRON_FAULT="hang-after:N"   the engine step blocks forever once N steps have run
"""

from __future__ import annotations

import logging
import os
import threading

from pagetron.backend.llm_engine import LLMEngine

logger = logging.getLogger(__name__)
ENV_VAR = "PAGETRON_FAULT"


def install_fault_injection(engine: LLMEngine) -> None:
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    kind, _, count = spec.partition(":")
    if kind not in ("raise-after", "hang-after") or not count.isdigit():
        raise ValueError(f"{ENV_VAR}={spec!r}: expected raise-after:N or hang-after:N")
    limit, steps, real_step = int(count), [0], engine.step

    def faulty_step():
        steps[0] += 1
        if steps[0] > limit:
            if kind == "raise-after":
                raise RuntimeError(f"injected fault ({ENV_VAR}={spec})")
            threading.Event().wait()
        return real_step()

    engine.step = faulty_step
    logger.warning("fault injection armed: %s", spec)
