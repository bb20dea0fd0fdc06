"""vLLM-named Triton custom metrics, fed from engine step stats on a thread of their own (each metric
update is a round trip to the Triton process, so the engine thread never makes them itself)."""

from __future__ import annotations

import queue
import threading
import time

import triton_python_backend_utils as pb_utils

from pagetron.backend.serving.step_stats import StepStats

FLUSH_INTERVAL_S = 0.25
_COUNTERS = {
    "num_prompt_tokens": ("vllm:prompt_tokens_total", "Number of prefill tokens processed."),
    "num_generation_tokens": ("vllm:generation_tokens_total", "Number of generation tokens processed."),
    "num_preemptions": ("vllm:num_preemptions_total", "Cumulative number of preemptions."),
    "prefix_cache_queries": (
        "vllm:prefix_cache_queries_total",
        "Prompt tokens looked up in the prefix cache.",
    ),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", "Prompt tokens served by the prefix cache."),
}
_GAUGES = {
    "num_running": ("vllm:num_requests_running", "Number of requests running in the engine."),
    "num_waiting": ("vllm:num_requests_waiting", "Number of requests waiting to be scheduled."),
    "kv_cache_usage": ("vllm:gpu_cache_usage_perc", "KV-cache usage; 1 means 100 percent."),
    "loras_resident": ("pagetron:lora_adapters_resident", "LoRA adapters in device slots."),
}
_LATENCY_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
]
_REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0]
_HISTOGRAMS = {
    "time_to_first_token": ("vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS),
    "time_per_output_token": (
        "vllm:time_per_output_token_seconds",
        "Time per output token.",
        _LATENCY_BUCKETS,
    ),
    "e2e_latency": ("vllm:e2e_request_latency_seconds", "End-to-end request latency.", _REQUEST_BUCKETS),
    "request_prompt_tokens": ("vllm:request_prompt_tokens", "Prompt tokens per request.", None),
    "request_generation_tokens": ("vllm:request_generation_tokens", "Generated tokens per request.", None),
}


# counters with one series per LoRA adapter (label lora_name), made when an adapter is first used
_PER_ADAPTER = {
    "lora_requests": ("pagetron:lora_requests_total", "Requests finished, per LoRA adapter."),
    "lora_generation_tokens": ("pagetron:lora_generation_tokens_total", "Tokens made, per LoRA adapter."),
}


def token_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len, like vLLM's."""
    buckets, base = [], 1
    while True:
        for m in (1, 2, 5):
            if base * m > max_model_len:
                return buckets
            buckets.append(float(base * m))
        base *= 10


class TritonMetrics:
    def __init__(self, labels: dict[str, str], max_model_len: int):
        self._families = []  # keep the families alive as long as their metrics
        self.counters = {
            k: self._metric(n, d, pb_utils.MetricFamily.COUNTER, labels) for k, (n, d) in _COUNTERS.items()
        }
        self.gauges = {
            k: self._metric(n, d, pb_utils.MetricFamily.GAUGE, labels) for k, (n, d) in _GAUGES.items()
        }
        self.histograms = {}
        for key, (name, description, buckets) in _HISTOGRAMS.items():
            buckets = buckets or token_buckets(max_model_len)
            self.histograms[key] = self._metric(
                name, description, pb_utils.MetricFamily.HISTOGRAM, labels, buckets
            )
        self._labels = labels
        self._per_adapter_families = {
            k: pb_utils.MetricFamily(name=n, description=d, kind=pb_utils.MetricFamily.COUNTER)
            for k, (n, d) in _PER_ADAPTER.items()
        }
        self._per_adapter: dict[tuple[str, str], object] = {}  # (key, lora_name) -> its series
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="pagetron-metrics", daemon=True)
        self._thread.start()

    def _metric(self, name, description, kind, labels, buckets=None):
        family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self._families.append(family)
        return family.Metric(labels=labels, buckets=buckets) if buckets else family.Metric(labels=labels)

    def record(self, stats: StepStats) -> None:
        self._queue.put(stats)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        # Steps are coalesced: one increment per counter and one set per gauge per flush, whatever the
        # number of steps since the last one.
        while True:
            batch = [self._queue.get()]
            time.sleep(FLUSH_INTERVAL_S)
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            stop = None in batch
            steps = [s for s in batch if s is not None]
            if steps:
                self._apply(steps)
            if stop:
                return

    def _apply(self, steps: list[StepStats]) -> None:
        for key, metric in self.counters.items():
            if total := sum(getattr(s, key) for s in steps):
                metric.increment(total)
        for key, metric in self.gauges.items():
            metric.set(getattr(steps[-1], key))
        for key, metric in self.histograms.items():
            for s in steps:
                for value in getattr(s, key):
                    metric.observe(value)
        for key, family in self._per_adapter_families.items():
            totals: dict[str, int] = {}
            for s in steps:
                for name, value in getattr(s, key).items():
                    totals[name] = totals.get(name, 0) + value
            for name, total in totals.items():
                if (key, name) not in self._per_adapter:
                    self._per_adapter[key, name] = family.Metric(labels={**self._labels, "lora_name": name})
                if total:
                    self._per_adapter[key, name].increment(total)
