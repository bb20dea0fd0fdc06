"""`pagetron serve` heals a model that unloaded itself: an engine that stalls (PAGETRON_FAULT
hang-after:N) fails its request, the model unloads itself (readiness drops), and serve reloads it with
the admin key, retrying with backoff while the load fails, until it is READY and serves again; no
tritonserver restart. An operator's own unload is left alone.

The fault is read from a file each time the model loads (PAGETRON_FAULT=file:PATH): the first load
hangs after 3 steps, the first reload fails (an invalid fault spec fails the load), the next one is
clean."""

from __future__ import annotations

import re

from grpc_helpers import pids_matching, stream_generate, wait_until
from pagetron.backend import SamplingParams
from pagetron.backend.serving.constants import FAULT_ENV
from serve_process import start_serve, stop_serve


def test_a_stalled_engine_is_reloaded_and_an_operators_unload_is_not(tmp_path, tiny_model_dir, tiny_llm):
    fault = tmp_path / "fault"
    fault.write_text("hang-after:3")  # warm-up and the first request's first steps, then a stall
    serve = start_serve(
        tmp_path,
        tiny_model_dir,
        "--max-model-len", "512", "--stall-timeout-s", "2",
        env={FAULT_ENV: f"file:{fault}"},
    )  # fmt: skip
    try:
        fault.write_text("not-a-fault")  # the next load fails (serve must retry) ...
        [server_pid] = serve.tritonserver_pids()
        stub_pattern = f"repo-{serve.ports['grpc']}/llm"
        [stub] = pids_matching(stub_pattern)

        r = stream_generate(serve.grpc_url, "Hello there", {"max_tokens": 20, "ignore_eos": True}, timeout=30)
        assert r.error is not None and "made no progress" in r.error, r
        assert wait_until(lambda: not serve.ready(), 20, 0.05), "the stalled model kept reporting READY"
        # ... which serve reports, then retries after a second
        assert wait_until(lambda: "reloading model 'llm' failed" in serve.text(), 120, 0.1), serve.text()[
            -3000:
        ]
        fault.write_text("")  # ... and the one after that is clean
        # serve logs the reload once its load call returns, which is just after readiness comes back
        healed = wait_until(lambda: "reloaded and READY again" in serve.text(), 120, 0.2)
        assert healed and serve.ready(), f"never READY again:\n{serve.text()[-3000:]}"

        text = serve.text()
        assert "model 'llm' unloaded itself after an engine fault (the engine made no progress" in text
        assert "next attempt in 1 s" in text
        attempts = [int(n) for n in re.findall(r"reloading model 'llm' \(attempt (\d+)\)", text)]
        assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) >= 2, attempts
        assert serve.tritonserver_pids() == [server_pid], "tritonserver was restarted"
        assert pids_matching(stub_pattern) not in ([], [stub])

        prompt = "Once upon a time"
        [want] = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        again = stream_generate(serve.grpc_url, prompt, {"temperature": 0, "max_tokens": 8}, timeout=60)
        assert again.error is None and again.token_ids == want.outputs[0].token_ids

        # an operator's unload (through the HTTP guard, with the admin key) stays an unload
        assert serve.model_request("unload") == 200
        assert wait_until(lambda: not serve.ready(), 30, 0.05)
        assert wait_until(lambda: "leaving it unloaded" in serve.text(), 30, 0.1), serve.text()[-3000:]
        # serve has looked and decided; it would reload within a second or two if it meant to
        assert not wait_until(serve.ready, 4, 0.2), "serve reloaded a model an operator had unloaded"
        assert serve.text().count("reloading model 'llm' (attempt") == len(attempts)
        assert serve.tritonserver_pids() == [server_pid]
    finally:
        code = stop_serve(serve)
    assert code == 0, serve.text()[-3000:]
