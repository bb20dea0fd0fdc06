"""Per-request measurements of the serving benchmark and their per-level summary (percentiles, rates)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """Times in seconds. itl_s holds one sample per streamed response after the first: the gap since the
    previous response divided by the tokens it carried (so it is seconds per token)."""

    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    output_tokens: int = 0
    input_tokens: int | None = None
    error: str | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation between order statistics, numpy's default method.
    None for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def summarize_level(concurrency: int, records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
    """The JSON row of one concurrency level. Rates divide by the level's wall time; latencies cover the
    successful requests only; num_errors counts the failed ones (first_error shows one message)."""
    ok = [r for r in records if r.error is None]
    failed = [r for r in records if r.error is not None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [sample for r in ok for sample in r.itl_s]
    e2e = [r.e2e_s for r in ok]
    output_tokens = sum(r.output_tokens for r in ok)
    input_counts = [r.input_tokens for r in ok if r.input_tokens is not None]
    rate = (lambda amount: round(amount / duration_s, 3)) if duration_s > 0 else (lambda amount: None)
    return {
        "concurrency": concurrency,
        "num_requests": len(ok),
        "num_errors": len(failed),
        "first_error": failed[0].error if failed else None,
        "duration_s": round(duration_s, 3),
        "output_tokens": output_tokens,
        "output_tokens_per_s": rate(output_tokens),
        "total_tokens_per_s": rate(output_tokens + sum(input_counts)),
        "requests_per_s": rate(len(ok)),
        "ttft_ms_p50": _ms(percentile(ttft, 50)),
        "ttft_ms_p99": _ms(percentile(ttft, 99)),
        "ttft_ms_mean": _ms(mean(ttft)),
        "itl_ms_p50": _ms(percentile(itl, 50)),
        "itl_ms_p99": _ms(percentile(itl, 99)),
        "itl_ms_mean": _ms(mean(itl)),
        "e2e_ms_p50": _ms(percentile(e2e, 50)),
        "e2e_ms_p99": _ms(percentile(e2e, 99)),
        "mean_input_tokens": mean(input_counts),
        "mean_output_tokens": mean([r.output_tokens for r in ok]),
    }


TABLE_COLUMNS = (
    ("concurrency", "conc"),
    ("num_requests", "reqs"),
    ("num_errors", "errors"),
    ("ttft_ms_p50", "TTFT p50 ms"),
    ("ttft_ms_p99", "TTFT p99 ms"),
    ("itl_ms_p50", "ITL p50 ms"),
    ("itl_ms_p99", "ITL p99 ms"),
    ("output_tokens_per_s", "out tok/s"),
    ("requests_per_s", "req/s"),
)


def format_table(levels: Sequence[dict[str, Any]]) -> str:
    rows = [[title for _, title in TABLE_COLUMNS]]
    for level in levels:
        rows.append([_cell(level[key]) for key, _ in TABLE_COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
