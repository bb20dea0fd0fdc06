"""Plain tritonclient gRPC streaming for the serving tests (independent of pagetron.client on purpose)."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient

# engine arguments of the test servers (and of the offline engine they are compared with)
SERVER_ENGINE_ARGS = {"kv_cache_memory_gb": 0.25, "max_num_seqs": 32, "max_num_batched_tokens": 2048}


@dataclass
class StreamResult:
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None
    num_responses: int = 0

    @property
    def text(self) -> str:
        return "".join(self.texts)


def make_inputs(prompt: str | bytes | list[int] | None, sampling: dict | str | None = None, **flags: bool):
    inputs = []
    if isinstance(prompt, list):
        t = grpcclient.InferInput("input_ids", [len(prompt)], "INT32")
        t.set_data_from_numpy(np.array(prompt, dtype=np.int32))
        inputs.append(t)
    elif prompt is not None:
        t = grpcclient.InferInput("text_input", [1], "BYTES")
        raw = prompt if isinstance(prompt, bytes) else prompt.encode()
        t.set_data_from_numpy(np.array([raw], dtype=np.object_))
        inputs.append(t)
    if sampling is not None:
        t = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        text = sampling if isinstance(sampling, str) else json.dumps(sampling)
        t.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
        inputs.append(t)
    for name, value in flags.items():
        t = grpcclient.InferInput(name, [1], "BOOL")
        t.set_data_from_numpy(np.array([value], dtype=np.bool_))
        inputs.append(t)
    return inputs


def stream_generate(
    url: str,
    prompt,
    sampling: dict | str | None = None,
    timeout: float = 120,
    headers: dict[str, str] | None = None,
    model: str = "llm",
    **flags,
):
    """One request over a gRPC stream; collects every response until the final one. With the header
    ``triton_grpc_error: true`` an error ends the stream with its gRPC status code (``error_code``).
    The prompt is left out of the text (``exclude_input_in_output`` true) unless the flags say otherwise."""
    flags = {"exclude_input_in_output": True, **flags}
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), headers=headers)
    result = StreamResult()
    try:
        client.async_stream_infer(model, make_inputs(prompt, sampling, return_finish_reason=True, **flags))
        while True:
            response, error = responses.get(timeout=timeout)
            result.num_responses += 1
            if error is not None:
                result.error, result.error_code = error.message(), error.status()
                return result
            raw = response.get_response()
            text = response.as_numpy("text_output")
            if text is not None and text.size:
                result.texts.append(text[0].decode())
            ids = response.as_numpy("output_ids")
            if ids is not None:
                result.token_ids += ids.tolist()
            reason = response.as_numpy("finish_reason")
            if reason is not None and reason.size and reason[0] not in (b"", b"None"):
                result.finish_reason = reason[0].decode()
            if raw.parameters["triton_final_response"].bool_param:
                return result
    finally:
        client.stop_stream()
        client.close()


def scrape_metrics(metrics_url: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r'^(vllm:[a-z0-9_]+)\{model="llm",version="1"\} ([0-9.e+-]+)$', line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def pids_matching(pattern: str) -> list[int]:
    """Processes whose command line matches ``pattern`` (pgrep -f)."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def wait_until(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.2) -> bool:
    """True as soon as ``predicate()`` is truthy; False once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def engine_idle(metrics: dict[str, float]) -> bool:
    """No request running or waiting and no KV block in use, by the engine's gauges."""
    busy = metrics["vllm:num_requests_running"] + metrics["vllm:num_requests_waiting"]
    return busy + metrics["vllm:gpu_cache_usage_perc"] == 0
