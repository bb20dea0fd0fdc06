"""Liveness probe: the model must report READY and generate one real token before a deadline."""

from __future__ import annotations

import asyncio
import time

from pagetron.client.errors import TritonRequestError
from pagetron.client.grpc_aio_client import AsyncTritonLLMClient
from pagetron.client.request import GenerateRequest

PROBE_PROMPT = "Hello"


def probe_request(request_id: str = "", lora_name: str | None = None) -> GenerateRequest:
    """One greedy token of PROBE_PROMPT, the whole answer at once (under LoRA adapter ``lora_name``)."""
    sampling = {"max_tokens": 1, "temperature": 0.0, **({"lora_name": lora_name} if lora_name else {})}
    return GenerateRequest(PROBE_PROMPT, sampling, stream=False, request_id=request_id)


async def _probe(url: str, model: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    async with AsyncTritonLLMClient(url, model) as client:
        if not await client.is_ready(timeout=timeout):
            raise TritonRequestError(f"model {model!r} is not ready", "UNAVAILABLE")
        result = await client.complete(
            probe_request("pagetron-probe"), timeout=max(0.001, deadline - time.monotonic())
        )
    tokens = sum(result.num_output_tokens)
    if tokens != 1:
        raise TritonRequestError(f"expected 1 generated token, got {tokens}", "INTERNAL")
    return f"ok: {model!r} ready and generated 1 token in {timeout - (deadline - time.monotonic()):.3f} s"


def probe(url: str, model: str = "llm", timeout: float = 10.0) -> tuple[bool, str]:
    """(healthy, one-line reason); returns within about `timeout` seconds whatever the server does."""
    try:
        message = asyncio.run(asyncio.wait_for(_probe(url, model, timeout), timeout))
    except TritonRequestError as e:
        return False, f"{url}: {e}"
    except (asyncio.TimeoutError, TimeoutError):
        return False, f"{url}: [DEADLINE_EXCEEDED] no answer within {timeout} s"
    except Exception as e:  # a probe reports every failure as unhealthy, with the reason on one line
        return False, f"{url}: {type(e).__name__}: {e}".replace("\n", " ")
    return True, message
