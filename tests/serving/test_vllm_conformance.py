"""What a client of Triton's vLLM backend sees from model `llm`, pinned against the real tritonserver with
raw tritonclient calls (as that backend's own sample client and CI tests make them):

- without `exclude_input_in_output`, a non-streaming response starts with the prompt; a streaming request
  that sets it to false is refused with the vLLM backend's message;
- every `return_*` flag adds exactly its output; `finish_reason` is "None" until the last response;
  `cumulative_logprob` moves with every response; `logprobs` is JSON null unless the request asked for
  logprobs, else one {token_id: {"logprob", "rank", "decoded_token"}} per new token;
  `num_input_tokens` is [1] uint32, `num_output_tokens` counts each response's new tokens;
- sampling parameters may come as the tensor or as request parameters, numbers as strings;
- n > 1 gives one element per output in every output tensor;
- a vLLM-backend model folder (`model.json`) loads after changing `backend:` only.
"""

from __future__ import annotations

import functools
import json
import queue
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from model_factory import FULL
from pagetron.backend import SamplingParams

PROMPT = "In this example,"
FLAGS = (
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
)
OUTPUT_OF_FLAG = {
    "return_finish_reason": "finish_reason",
    "return_cumulative_logprob": "cumulative_logprob",
    "return_logprobs": "logprobs",
    "return_num_input_tokens": "num_input_tokens",
    "return_num_output_tokens": "num_output_tokens",
}


def bytes_input(name: str, text: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return tensor


def bool_input(name: str, value: bool) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def infer(
    url: str,
    stream: bool,
    sampling: dict | None,
    flags: dict[str, bool] | None = None,
    exclude_input_in_output: bool | None = None,
    parameters: dict | None = None,
    prompt: str = PROMPT,
) -> list:
    """All responses of one request over a gRPC stream: (result, error) pairs, the last one final."""
    inputs = [bytes_input("text_input", prompt), bool_input("stream", stream)]
    if sampling is not None:
        inputs.append(bytes_input("sampling_parameters", json.dumps(sampling)))
    if exclude_input_in_output is not None:
        inputs.append(bool_input("exclude_input_in_output", exclude_input_in_output))
    for flag, value in (flags or {}).items():
        inputs.append(bool_input(flag, value))
    responses: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(lambda result, error: responses.put((result, error)))
        client.async_stream_infer("llm", inputs, parameters=parameters, enable_empty_final_response=True)
        out = []
        while True:
            result, error = responses.get(timeout=60)
            if error is not None:
                out.append((None, error))
                break
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.get_response().outputs:
                out.append((result, None))
            if final:
                break
        client.stop_stream()
    return out


def strings(result, name: str) -> list[str] | None:
    array = result.as_numpy(name)
    return None if array is None else [x.decode() for x in array]


@pytest.fixture(scope="module")
def offline(tiny_llm):
    """The served model's answer to PROMPT offline: 16 greedy tokens with top-2 logprobs."""
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=2)
    [out] = tiny_llm.generate(PROMPT, params, use_tqdm=False)
    return out


SAMPLING = {"temperature": "0", "top_p": "1"}  # strings, as the vLLM backend's CI sends them


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
@pytest.mark.parametrize("logprobs", [None, 0, 2], ids=["no-logprobs", "logprobs-0", "logprobs-2"])
@pytest.mark.parametrize("flags", ["absent", "all-true", "all-false", *FLAGS])
def test_additional_outputs(triton_server, offline, tiny_llm, stream, logprobs, flags):
    sampling = {**SAMPLING, **({} if logprobs is None else {"logprobs": logprobs})}
    given = {
        "absent": {},
        "all-true": dict.fromkeys(FLAGS, True),
        "all-false": dict.fromkeys(FLAGS, False),
    }.get(flags, {flags: True})
    responses = infer(triton_server.grpc_url, stream, sampling, given, parameters=sampling)
    assert all(error is None for _, error in responses), responses
    results = [result for result, _ in responses]
    assert len(results) >= (2 if stream else 1) and (stream or len(results) == 1)
    expected = offline.outputs[0]

    # text_output: the prompt first when not streaming (exclude_input_in_output not given)
    text = "".join(strings(r, "text_output")[0] for r in results)
    assert text == (expected.text if stream else PROMPT + expected.text)

    for flag, output in OUTPUT_OF_FLAG.items():  # exactly the outputs asked for
        wanted = given.get(flag, False)
        assert all((r.as_numpy(output) is not None) == wanted for r in results), (flag, output)

    if given.get("return_finish_reason"):
        reasons = [strings(r, "finish_reason") for r in results]
        assert reasons == [["None"]] * (len(results) - 1) + [[expected.finish_reason]]
    if given.get("return_num_input_tokens"):
        for r in results:
            counts = r.as_numpy("num_input_tokens")
            assert counts.dtype == np.uint32 and counts.tolist() == [len(offline.prompt_token_ids)]
    new_tokens = [len(expected.token_ids)] if not stream else None
    if given.get("return_num_output_tokens"):
        counts = [r.as_numpy("num_output_tokens") for r in results]
        assert all(c.dtype == np.uint32 and c.shape == (1,) and c[0] > 0 for c in counts)
        new_tokens = [int(c[0]) for c in counts]
        assert sum(new_tokens) == len(expected.token_ids)
    if given.get("return_cumulative_logprob"):
        values = [float(r.as_numpy("cumulative_logprob")[0]) for r in results]
        assert all(a != b for a, b in zip([0.0, *values], values))  # it moves with every response
        assert values[-1] == pytest.approx(expected.cumulative_logprob, abs=1e-4)
    if given.get("return_logprobs"):
        seen = 0
        for i, r in enumerate(results):
            steps = json.loads(strings(r, "logprobs")[0])
            if logprobs is None:
                assert steps is None
                continue
            if new_tokens is not None:
                assert len(steps) == new_tokens[i]
            decoded, ids = "", []
            for step in steps:
                assert 1 <= len(step) <= logprobs + 1 and all(isinstance(k, str) for k in step)
                ranked = {entry["rank"]: (int(t), entry["decoded_token"]) for t, entry in step.items()}
                assert all(set(e) == {"logprob", "rank", "decoded_token"} for e in step.values())
                ids.append(ranked[1][0])  # greedy: the sampled token is the most likely one
                decoded += ranked[1][1]
                reference = expected.logprobs[seen]
                for token_id, entry in step.items():
                    assert entry["logprob"] == pytest.approx(reference[int(token_id)].logprob, abs=1e-4)
                seen += 1
            text_i = strings(r, "text_output")[0]
            # the decoded tokens spell the response's text (special ones are left out of the text)
            decode = functools.partial(tiny_llm.tokenizer.decode, ids, clean_up_tokenization_spaces=False)
            assert decoded == decode(skip_special_tokens=False)
            assert decode(skip_special_tokens=True) == (text_i if stream else text_i.removeprefix(PROMPT))
        assert logprobs is None or seen == len(expected.token_ids)


def test_exclude_input_in_output(triton_server, offline):
    url, text = triton_server.grpc_url, offline.outputs[0].text
    [(excluded, _)] = infer(url, False, SAMPLING, exclude_input_in_output=True)
    assert strings(excluded, "text_output") == [text]
    [(included, _)] = infer(url, False, SAMPLING, exclude_input_in_output=False)
    assert strings(included, "text_output") == [PROMPT + text]
    streamed = infer(url, True, SAMPLING, exclude_input_in_output=True)
    assert "".join(strings(r, "text_output")[0] for r, _ in streamed) == text
    [(_, error)] = infer(url, True, SAMPLING, exclude_input_in_output=False)
    assert "When streaming, `exclude_input_in_output` = False is not allowed." in error.message()


def test_sampling_parameters_as_request_parameters(triton_server, tiny_llm):
    """No tensor: the request parameters carry them (gRPC and HTTP), numbers as strings."""
    url = triton_server.grpc_url
    params = {"max_tokens": "5", "temperature": "0", "ignore_eos": "true"}
    [expected] = tiny_llm.generate(
        PROMPT, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False
    )
    [(result, _)] = infer(url, False, None, {"return_num_output_tokens": True}, False, parameters=params)
    assert strings(result, "text_output") == [PROMPT + expected.outputs[0].text]
    assert result.as_numpy("num_output_tokens").tolist() == [5]
    body = json.dumps({"text_input": PROMPT, "parameters": {**params, "max_tokens": 5}}).encode()
    request = urllib.request.Request(f"http://{triton_server.http_url}/v2/models/llm/generate", data=body)
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert answer["text_output"] == PROMPT + expected.outputs[0].text  # the HTTP default prepends too


def test_n_outputs_give_one_element_each(triton_server, tiny_llm):
    sampling = {"n": 3, "temperature": 0.8, "seed": 7, "max_tokens": 6, "ignore_eos": True}
    [expected] = tiny_llm.generate(PROMPT, SamplingParams(**sampling), use_tqdm=False)
    flags = dict.fromkeys(FLAGS, True)
    [(result, _)] = infer(triton_server.grpc_url, False, sampling, flags, exclude_input_in_output=True)
    assert strings(result, "text_output") == [o.text for o in expected.outputs]
    assert strings(result, "finish_reason") == ["length"] * 3
    assert result.as_numpy("num_output_tokens").tolist() == [6, 6, 6]
    assert result.as_numpy("cumulative_logprob").shape == (3,)
    assert [json.loads(x) for x in strings(result, "logprobs")] == [None, None, None]
    assert result.as_numpy("num_input_tokens").tolist() == [len(expected.prompt_token_ids)]


def test_a_vllm_backend_model_folder_loads_after_changing_backend_only(
    triton_server, tiny_model_dir, small_server
):
    """model.json (vLLM engine arguments) in the version folder, `backend: "pagetron"` in config.pbtxt;
    harmless vLLM keys are accepted, an unknown one fails the load naming it. Its tensors come from
    Triton's auto-complete (the model declares them), the same as those the launcher writes into the
    configs of its repositories (served without auto-complete by `small_server`)."""
    folder = triton_server.repository / "vllm_model"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(
        'backend: "pagetron"\ninstance_group [ { count: 1 kind: KIND_MODEL } ]\n'
    )
    engine = {
        "model": str(tiny_model_dir),
        "gpu_memory_utilization": 0.5,
        "enforce_eager": True,
        "max_model_len": 512,
        "disable_log_requests": True,
        "disable_log_stats": False,
    }
    (folder / "1" / "model.json").write_text(json.dumps(engine))
    try:
        load(triton_server, "vllm_model")
        sampling = {**SAMPLING, "max_tokens": 4}
        inputs = [bytes_input("text_input", PROMPT), bool_input("stream", False)]
        inputs.append(bytes_input("sampling_parameters", json.dumps(sampling)))
        results: queue.Queue = queue.Queue()
        with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
            client.start_stream(lambda result, error: results.put((result, error)))
            client.async_stream_infer("vllm_model", inputs)
            result, error = results.get(timeout=60)
            client.stop_stream()
        assert error is None and strings(result, "text_output")[0].startswith(PROMPT)
        assert served_tensors(triton_server, "vllm_model") == served_tensors(small_server, "llm")
        unload(triton_server, "vllm_model")
        if FULL:  # the served path of a refused key; test_vllm_engine_arguments_map_onto_pagetrons: the rule
            (folder / "1" / "model.json").write_text(json.dumps({**engine, "swap_space_gb": 4}))
            with pytest.raises(urllib.error.HTTPError) as refused:
                load(triton_server, "vllm_model")
            assert "swap_space_gb" in refused.value.read().decode()
    finally:
        unload(triton_server, "vllm_model", missing_ok=True)


def served_tensors(server, model: str) -> dict:
    """The model's inputs, outputs and transaction policy as the server reports its config."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        config = client.get_model_config(model, as_json=True)["config"]
    tensors = {key: sorted(config[key], key=lambda t: t["name"]) for key in ("input", "output")}
    return {**tensors, "policy": config.get("model_transaction_policy")}


def load(server, model: str) -> None:
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/repository/models/{model}/load",
        data=b"{}",
        method="POST",
        headers=server.admin_headers,
    )
    urllib.request.urlopen(request, timeout=300)


def unload(server, model: str, missing_ok: bool = False) -> None:
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/repository/models/{model}/unload",
        data=b"{}",
        method="POST",
        headers=server.admin_headers,
    )
    try:
        urllib.request.urlopen(request, timeout=120)
    except urllib.error.HTTPError:
        if not missing_ok:
            raise


def test_vllm_engine_arguments_map_onto_pagetrons():
    from pagetron.backend.core.config import ConfigError
    from pagetron.backend.serving.vllm_compat import engine_config_from_vllm

    config = engine_config_from_vllm({"tensor_parallel_size": 2, "dtype": "half", "swap_space": 4})
    assert (config.tensor_parallel_size, config.dtype) == (2, "float16")
    config = engine_config_from_vllm({"enable_lora": "true", "max_loras": 4, "max_lora_rank": 32})
    assert (config.enable_lora, config.max_loras, config.max_lora_rank) == (True, 4, 32)
    for key, value in [("pipeline_parallel_size", 2), ("lora_modules", [])]:
        with pytest.raises(ConfigError) as refused:
            engine_config_from_vllm({key: value})
        assert refused.value.key == key
