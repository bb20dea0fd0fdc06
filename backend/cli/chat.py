"""`pagetron chat`: an interactive chat that streams the answer token by token."""

from __future__ import annotations

import argparse
import sys

from pagetron.backend.cli import engine_args, sampling_params
from pagetron.backend.engine.llm import LLM

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
    "Explain what a KV cache is in one paragraph.",
]


def stream_answer(llm: LLM, messages: list[dict], params) -> str:
    engine = llm.engine
    request_id = engine.add_request({"prompt_token_ids": llm.encode_chat(messages)}, params)
    text = ""
    while True:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            delta = out.outputs[0].delta_text
            sys.stdout.write(delta)
            sys.stdout.flush()
            text += delta
            if out.finished:
                sys.stdout.write("\n")
                return text


def run_chat(ns: argparse.Namespace) -> int:
    llm = LLM(**engine_args(ns))
    params = sampling_params(ns)
    history: list[dict] = [{"role": "system", "content": ns.system}] if ns.system else []
    questions = iter(DEMO_QUESTIONS) if ns.demo else None
    while True:
        if questions is not None:
            user = next(questions, None)
            if user is None:
                return 0
            print(f"> {user}")
        else:
            try:
                user = input("> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not user.strip():
                continue
        history.append({"role": "user", "content": user})
        history.append({"role": "assistant", "content": stream_answer(llm, history, params)})
