"""LoRA adapters served from the real tritonserver as Triton's vLLM backend serves them: the session's
model has a `multi_lora.json` ({"name": "PEFT folder"}) beside its engine arguments, and requests pick an
adapter with `lora_name` in `sampling_parameters` (what that backend's sample client sends for
`--lora-name`), and through the OpenAI frontend, where an adapter is a model of its own. Concurrent
streams for the base model and two adapters each get the offline engine's tokens for their adapter; an
adapter dropped into `lora_dir` while serving is used by the next request; an unknown name is INVALID_ARG
listing the known ones, and the model keeps serving."""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from grpc_helpers import stream_generate, wait_until
from openai_frontend import start_frontend
from pagetron.backend import LLM, LoRARequest, SamplingParams

MODEL = "llm"  # the session server's: sql and chat in its multi_lora.json, lora_dir empty at first
PROMPT = "Once upon a time"
MAX_TOKENS = 8
IGNORE_EOS = {"ignore_eos": True}  # Pagetron's extra sampling key: every answer runs to MAX_TOKENS


@pytest.fixture(scope="module")
def lora_model(triton_server, lora_dir):
    return triton_server, lora_dir


@pytest.fixture(scope="module")
def adapters(lora_adapters):
    return lora_adapters


@pytest.fixture(scope="module")
def offline(tiny_model_dir, adapters) -> dict[str | None, tuple[list[int], str]]:
    """The offline engine's (token ids, text) per adapter name (None: the base model)."""
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=1, max_lora_rank=8, kv_cache_memory_gb=0.05)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    requests = {name: LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(adapters.items())}
    requests = {None: None, **requests}
    out = {}
    for name, request in requests.items():
        [result] = llm.generate(PROMPT, params, use_tqdm=False, lora_request=request)
        out[name] = (result.outputs[0].token_ids, result.outputs[0].text)
    assert len({tuple(ids) for ids, _ in out.values()}) == len(out)  # every adapter changes the answer
    return out


@pytest.fixture(scope="module")
def expected(offline) -> dict[str | None, list[int]]:
    return {name: ids for name, (ids, _) in offline.items()}


def generate(server, lora_name: str | None):
    sampling = {"temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    if lora_name is not None:
        sampling["lora_name"] = lora_name
    return stream_generate(server.grpc_url, PROMPT, sampling, model=MODEL, stream=True)


def test_concurrent_streams_each_get_their_adapters_tokens(lora_model, expected):
    server, _ = lora_model
    names = [None, "sql", "chat", "sql", None, "chat"]
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda name: generate(server, name), names))
    assert [r.error for r in results] == [None] * len(names)
    assert [r.token_ids for r in results] == [expected[name] for name in names]


def lora_metrics(server) -> dict[tuple[str, str], float]:
    """(metric, lora_name) -> value of the per-adapter counters, and the resident gauge as ("...", "")."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if m := re.match(r"^(pagetron:lora_\w+)\{(.*)\} ([0-9.e+-]+)$", line):
            name = re.search(r'lora_name="([^"]*)"', m[2])
            values[m[1], name[1] if name else ""] = float(m[3])
    return values


def test_metrics_count_requests_and_tokens_per_adapter(lora_model):
    """After the concurrent streams above (sql and chat twice each, 8 tokens each)."""
    server, _ = lora_model
    expected = {
        ("pagetron:lora_requests_total", "sql"): 2.0,
        ("pagetron:lora_requests_total", "chat"): 2.0,
        ("pagetron:lora_generation_tokens_total", "sql"): 2.0 * MAX_TOKENS,
        ("pagetron:lora_generation_tokens_total", "chat"): 2.0 * MAX_TOKENS,
        ("pagetron:lora_adapters_resident", ""): 2.0,
    }
    assert wait_until(lambda: lora_metrics(server) == expected, 10, 0.1), lora_metrics(server)


def test_an_adapter_dropped_into_lora_dir_is_used_by_the_next_request(lora_model, adapters, expected):
    server, lora_dir = lora_model
    missing = generate(server, "late")
    assert missing.error is not None and "unknown LoRA adapter 'late'" in missing.error
    (lora_dir / "late").symlink_to(adapters["late"], target_is_directory=True)
    result = generate(server, "late")
    assert result.error is None and result.token_ids == expected["late"]


@pytest.mark.parametrize("name", ["nope", "/etc/passwd", "../sql"])
def test_an_unknown_adapter_is_invalid_arg_naming_the_known_ones(lora_model, expected, name):
    server, _ = lora_model
    refused = generate(server, name)
    assert refused.error.startswith("[INVALID_ARG] lora_name: unknown LoRA adapter"), refused.error
    assert "known adapters: sql, chat" in refused.error
    assert generate(server, "sql").token_ids == expected["sql"]  # the model keeps serving


def test_through_the_openai_frontend_an_adapter_is_a_model(lora_model, offline, tmp_path):
    server, _ = lora_model
    frontend = start_frontend(server.grpc_url, tmp_path / "frontend.log", api_key=None,
                              extra=["--llm-model", MODEL, "--lora-modules", "sql,chat"])  # fmt: skip
    try:
        client = frontend.client()
        cards = {m.id: m for m in client.models.list().data}
        assert {"sql", "chat", MODEL} <= set(cards) and cards["sql"].model_extra["parent"] == MODEL
        for model, name in [(MODEL, None), ("sql", "sql"), ("chat", "chat")]:
            completion = client.completions.create(
                model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body=IGNORE_EOS
            )
            assert completion.choices[0].text == offline[name][1], model
        stream = client.completions.create(model="sql", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True, extra_body=IGNORE_EOS)  # fmt: skip
        assert "".join(chunk.choices[0].text for chunk in stream) == offline["sql"][1]
        chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0)  # fmt: skip
        assert chat.usage.completion_tokens == 4
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="late-source", prompt=PROMPT, max_tokens=2)
    finally:
        frontend.stop()


def test_with_resolve_adapters_a_name_in_lora_dir_becomes_a_model(lora_model, adapters, offline, tmp_path):
    """`pagetron openai --resolve-adapters` (what `pagetron serve --openai` passes when the engine has a
    lora_dir): a model name that is not served is tried as an adapter, which the server finds by name in
    its lora_dir. Before the folder is there it is 404 and not listed; after, it answers with that
    adapter's tokens and /v1/models lists it under the llm model. A folder that does not load is a 400
    naming the model; a path is no name."""
    server, lora_dir = lora_model
    extra = ["--llm-model", MODEL, "--lora-modules", "sql", "--resolve-adapters"]
    frontend = start_frontend(server.grpc_url, tmp_path / "frontend.log", api_key=None, extra=extra)
    try:
        client = frontend.client()
        with pytest.raises(openai.NotFoundError, match="'dropped' does not exist"):
            client.completions.create(model="dropped", prompt=PROMPT, max_tokens=2)
        assert "dropped" not in {m.id for m in client.models.list().data}
        (lora_dir / "dropped").symlink_to(adapters["late"], target_is_directory=True)
        completion = client.completions.create(
            model="dropped", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body=IGNORE_EOS
        )
        assert completion.choices[0].text == offline["late"][1] and completion.model == "dropped"
        stream = client.completions.create(model="dropped", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True, extra_body=IGNORE_EOS)  # fmt: skip
        assert "".join(chunk.choices[0].text for chunk in stream) == offline["late"][1]
        cards = {m.id: m for m in client.models.list().data}
        assert [m for m in cards if m in ("sql", "dropped")] == ["sql", "dropped"]
        assert cards["dropped"].model_extra["parent"] == MODEL
        assert client.models.retrieve("dropped").id == "dropped"
        with pytest.raises(openai.BadRequestError, match="not served by this endpoint"):  # as a named one
            client.embeddings.create(model="dropped", input="hi")

        (lora_dir / "broken").mkdir()
        (lora_dir / "broken" / "adapter_config.json").write_text('{"r": 4, "target_modules": ["q_proj"]}')
        with pytest.raises(openai.BadRequestError, match="adapter_model.safetensors not found") as refused:
            client.completions.create(model="broken", prompt=PROMPT, max_tokens=2)
        assert refused.value.body["param"] == "model"
        for name in ("../sql", "chat/../sql"):
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model=name, prompt=PROMPT, max_tokens=2)
        assert "broken" not in {m.id for m in client.models.list().data}
    finally:
        frontend.stop()
