"""`pagetron generate`: prompts from arguments or a JSONL file, one JSON line out per prompt."""

from __future__ import annotations

import argparse
import json

from pagetron.backend.cli import dump_jsonl, engine_args, sampling_params
from pagetron.backend.core.sampling_params import SamplingParams
from pagetron.backend.engine.llm import LLM


def read_requests(path: str) -> list[dict]:
    requests = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
                raise ValueError(
                    f'{path}:{lineno}: expected an object with exactly one of "prompt" or "messages"'
                )
            requests.append(row)
    return requests


def run_generate(ns: argparse.Namespace) -> int:
    default_params = sampling_params(ns)
    requests = [{"prompt": p} for p in ns.prompts]
    if ns.input:
        requests += read_requests(ns.input)
    if not requests:
        raise ValueError("no prompts: give them as arguments or with --input FILE.jsonl")
    llm = LLM(**engine_args(ns))
    prompts, params = [], []
    for row in requests:
        if "messages" in row:
            prompts.append({"prompt_token_ids": llm.encode_chat(row["messages"])})
        elif ns.chat:
            prompts.append(
                {"prompt_token_ids": llm.encode_chat([{"role": "user", "content": row["prompt"]}])}
            )
        else:
            prompts.append(row["prompt"])
        overrides = row.get("sampling_params")
        params.append(_merge(default_params, overrides) if overrides else default_params)
    outputs = llm.generate(prompts, params, use_tqdm=ns.output is not None)
    rows = []
    for row, out in zip(requests, outputs):
        rows.append(
            {
                **{k: v for k, v in row.items() if k != "sampling_params"},
                "prompt_token_ids": out.prompt_token_ids,
                "outputs": [
                    {"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
                    for o in out.outputs
                ],
            }
        )
    dump_jsonl(rows, ns.output)
    return 0


def _merge(base: SamplingParams, overrides: dict) -> SamplingParams:
    from dataclasses import asdict

    return SamplingParams.from_dict({**asdict(base), **overrides})
