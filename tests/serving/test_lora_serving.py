"""LoRA adapters served from the real tritonserver as Triton's vLLM backend serves them: a model folder
with `multi_lora.json` ({"name": "PEFT folder"}) beside its engine arguments, and requests that pick an
adapter with `lora_name` in `sampling_parameters` (what that backend's sample client sends for
`--lora-name`). Concurrent streams for the base model and two adapters each get the offline engine's
tokens for their adapter; an adapter dropped into `lora_dir` while serving is used by the next request;
an unknown name is INVALID_ARG listing the known ones, and the model keeps serving."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from grpc_helpers import stream_generate
from model_factory import make_lora_adapter
from pagetron.backend import LLM, LoRARequest, SamplingParams

MODEL = "lora_llm"
PROMPT = "Once upon a time"
MAX_TOKENS = 8


def model_request(server, action: str) -> None:
    url = f"http://{server.http_url}/v2/repository/models/{MODEL}/{action}"
    request = urllib.request.Request(url, data=b"{}", method="POST", headers=server.admin_headers)
    urllib.request.urlopen(request, timeout=300)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("served-adapters")
    all_projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        "sql": make_lora_adapter(tiny_model_dir, root / "sql", 4, 8, ["q_proj", "v_proj"], seed=1),
        "chat": make_lora_adapter(tiny_model_dir, root / "chat", 8, 16, all_projections, seed=2),
        "late": make_lora_adapter(tiny_model_dir, root / "late-source", 2, 4, ["down_proj"], seed=3),
    }


@pytest.fixture(scope="module")
def lora_model(triton_server, tiny_model_dir, adapters, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("lora-dir")
    folder = triton_server.repository / MODEL
    (folder / "1").mkdir(parents=True)
    config = 'backend: "pagetron"\ninstance_group [ { count: 1 kind: KIND_MODEL } ]\n'
    (folder / "config.pbtxt").write_text(config)
    engine = {"model": str(tiny_model_dir), "enable_lora": True, "max_loras": 2, "max_lora_rank": 8,
              "max_model_len": 512, "kv_cache_memory_gb": 0.05, "lora_dir": str(lora_dir)}  # fmt: skip
    (folder / "1" / "engine_args.json").write_text(json.dumps(engine))
    modules = {"sql": str(adapters["sql"]), "chat": str(adapters["chat"])}
    (folder / "1" / "multi_lora.json").write_text(json.dumps(modules))
    model_request(triton_server, "load")
    yield triton_server, lora_dir
    model_request(triton_server, "unload")


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapters) -> dict[str | None, list[int]]:
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=1, max_lora_rank=8, kv_cache_memory_gb=0.05)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = {None: llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids}
    for i, (name, path) in enumerate(adapters.items()):
        request = LoRARequest(name, i + 1, str(path))
        out[name] = llm.generate(PROMPT, params, use_tqdm=False, lora_request=request)[0].outputs[0].token_ids
    assert len({tuple(v) for v in out.values()}) == len(out)  # every adapter changes the answer
    return out


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
