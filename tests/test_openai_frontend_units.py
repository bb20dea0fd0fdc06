"""Frontend pieces that need no server: /health when the engine is only full, and how `pagetron serve`
restarts a frontend that keeps dying."""

from __future__ import annotations

import sys
import time

from starlette.testclient import TestClient

from pagetron.backend.openai_api.app import FrontendSettings, create_app
from pagetron.backend.serving.supervisor import OpenAIFrontend
from pagetron.client.errors import TritonRequestError


class RefusingGateway:
    def __init__(self, error: TritonRequestError):
        self.error = error

    async def complete(self, request):
        raise self.error

    async def close(self) -> None:
        pass


def health_with(error: TritonRequestError) -> tuple[int, dict]:
    app = create_app(FrontendSettings(triton_url="127.0.0.1:1"))
    with TestClient(app) as client:
        app.state.gateway = RefusingGateway(error)
        response = client.get("/health")
    return response.status_code, response.json()


def test_health_is_busy_not_unhealthy_when_the_queue_is_full():
    full = TritonRequestError(
        "the server is at capacity: 9 requests in flight (...); retry later", "UNAVAILABLE"
    )
    assert health_with(full) == (200, {"status": "busy", "generated_tokens": 0, "detail": full.message})
    status, body = health_with(TritonRequestError("engine thread died", "UNAVAILABLE"))
    assert status == 503 and body["error"]["message"].startswith(
        "unhealthy: [UNAVAILABLE] engine thread died"
    )


def test_a_frontend_that_dies_at_once_is_restarted_ever_more_slowly(capsys):
    frontend = OpenAIFrontend("127.0.0.1:1", port=1, first_retry_s=0.2)
    frontend.command = [sys.executable, "-c", "raise SystemExit(3)"]
    starts, delays = 0, []
    deadline = time.monotonic() + 30  # the delays alone are 0.2 + 0.4 + 0.8 s
    while time.monotonic() < deadline and starts < 4:
        before = frontend.process
        frontend.ensure_running()
        if frontend.process is not before:
            starts += 1
        if frontend.retry_at is not None and (not delays or delays[-1][0] is not before):
            delays.append((before, round(frontend.retry_at - time.monotonic(), 1)))
        time.sleep(0.05)
    frontend.process.wait()
    assert starts == 4  # the first start and three restarts, after 0.2, 0.4 and 0.8 s
    assert [d for _, d in delays][:3] == [0.2, 0.4, 0.8]
    assert "restarting in 0.2 s" in capsys.readouterr().err


def test_serve_openai_names_the_engines_adapters_and_resolves_others_with_a_lora_dir():
    from pagetron.backend.serving.supervisor import ServeSettings, openai_frontend

    engine = {"enable_lora": True, "lora_modules": {"sql": "/a/sql", "chat": "/a/chat"}}
    url = "127.0.0.1:8001"
    named = openai_frontend(ServeSettings(engine, openai_port=9000), url)
    assert named.command[-2:] == ["--lora-modules", "sql,chat"]
    resolving = openai_frontend(ServeSettings({**engine, "lora_dir": "/a"}, openai_port=9000), url)
    assert resolving.command[-3:] == ["--lora-modules", "sql,chat", "--resolve-adapters"]
    assert openai_frontend(ServeSettings(engine), url) is None  # no --openai


def test_concurrent_requests_for_a_new_adapter_name_share_one_probe():
    """--resolve-adapters: five requests for one name at once send one probe; a server whose model has no
    LoRA at all answers as for an unknown name (404 for the request, not 400)."""
    import asyncio

    from pagetron.backend.openai_api.triton_gateway import ServedModels, TritonGateway

    class ProbedClient:
        def __init__(self, error: TritonRequestError | None = None):
            self.calls, self.error, self.release = [], error, asyncio.Event()

        async def complete(self, request):
            self.calls.append(request.sampling_params["lora_name"])
            await self.release.wait()
            if self.error is not None:
                raise self.error

    async def scenario(error: TritonRequestError | None) -> tuple[list[bool], list[str], list[str]]:
        gateway = TritonGateway("127.0.0.1:1", ServedModels(resolve_adapters=True))
        gateway.llm = client = ProbedClient(error)
        waiters = [asyncio.ensure_future(gateway.resolve_adapter("late")) for _ in range(5)]
        await asyncio.sleep(0)
        client.release.set()
        found = list(await asyncio.gather(*waiters))
        return found, client.calls, gateway.adapters()

    assert asyncio.run(scenario(None)) == ([True] * 5, ["late"], ["late"])
    no_lora = TritonRequestError("lora_name: this model serves no LoRA adapters (enable_lora is off)",
                                 "INVALID_ARG")  # fmt: skip
    assert asyncio.run(scenario(no_lora)) == ([False] * 5, ["late"], [])
