"""Client library and CLI: tensors, response decoding, errors, argument parsing, probe failures (no server
needed for these); streaming, errors and probe against the real tritonserver (`triton_server` fixture)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from pagetron.backend import SamplingParams
from pagetron.client.cli import add_client_commands, client_sampling_params, run_client, run_probe
from pagetron.client.errors import TritonRequestError, triton_code
from pagetron.client.grpc_aio_client import AsyncTritonLLMClient
from pagetron.client.grpc_client import TritonLLMClient, complete, generate
from pagetron.client.probe import probe
from pagetron.client.request import GenerateRequest
from pagetron.client.response import GenerationChunk, GenerationResult, parse_result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagetron")
    add_client_commands(p.add_subparsers(dest="command", required=True))
    return p


# ---- request tensors -------------------------------------------------------------------------------------


def test_text_request_tensors_exact():
    arrays = GenerateRequest("Hi é", {"max_tokens": 4, "temperature": 0.0}, stream=True).input_arrays()
    assert list(arrays) == [
        "text_input",
        "stream",
        "sampling_parameters",
        "exclude_input_in_output",
        "return_finish_reason",
        "return_num_output_tokens",
    ]
    assert arrays["text_input"].dtype == np.object_ and arrays["text_input"].tolist() == ["Hi é".encode()]
    assert arrays["sampling_parameters"].tolist() == [b'{"max_tokens": 4, "temperature": 0.0}']
    for name in ("stream", "exclude_input_in_output", "return_finish_reason", "return_num_output_tokens"):
        assert arrays[name].dtype == np.bool_ and arrays[name].tolist() == [True]


def test_token_id_request_tensors_and_flags():
    request = GenerateRequest(
        [5, 6, 7],
        stream=False,
        exclude_input_in_output=False,
        return_finish_reason=False,
        return_num_output_tokens=False,
        return_num_input_tokens=True,
        return_logprobs=True,
        return_cumulative_logprob=True,
    )
    arrays = request.input_arrays()
    assert list(arrays) == [
        "input_ids",
        "stream",
        "exclude_input_in_output",
        "return_cumulative_logprob",
        "return_logprobs",
        "return_num_input_tokens",
    ]
    assert arrays["input_ids"].dtype == np.int32 and arrays["input_ids"].tolist() == [5, 6, 7]
    assert arrays["stream"].tolist() == [False] and arrays["exclude_input_in_output"].tolist() == [False]


def test_infer_inputs_names_types_shapes():
    inputs = GenerateRequest([1, 2], {"max_tokens": 1}).infer_inputs()
    described = [(i.name(), i.datatype(), i.shape()) for i in inputs]
    assert described == [
        ("input_ids", "INT32", [2]),
        ("stream", "BOOL", [1]),
        ("sampling_parameters", "BYTES", [1]),
        ("exclude_input_in_output", "BOOL", [1]),
        ("return_finish_reason", "BOOL", [1]),
        ("return_num_output_tokens", "BOOL", [1]),
    ]
    assert inputs[0]._get_content() == np.array([1, 2], dtype=np.int32).tobytes()
    assert inputs[1]._get_content() == b"\x01"


@pytest.mark.parametrize(
    ("prompt", "words"), [([5, 2**31], "token ids must be in [0, 2**31)"), ("caf\udce9", "surrogates")]
)
def test_a_request_that_cannot_be_encoded_is_invalid_arg_in_both_clients(prompt, words):
    with pytest.raises(TritonRequestError) as raised:
        GenerateRequest(prompt, {"max_tokens": 1}).infer_inputs()
    assert raised.value.code == "INVALID_ARG" and words in raised.value.message
    with pytest.raises(TritonRequestError) as raised:  # the sync client raises it before it sends anything
        list(generate(f"localhost:{free_port()}", prompt, {"max_tokens": 1}, timeout=5))
    assert raised.value.code == "INVALID_ARG"


# ---- response decoding -----------------------------------------------------------------------------------


def fake_result(final: bool, **outputs: np.ndarray) -> InferResult:
    """A ModelInferResponse as the server sends it (raw contents), wrapped like tritonclient does."""
    datatypes = {np.object_: "BYTES", np.int32: "INT32", np.uint32: "UINT32", np.float32: "FP32"}
    response = service_pb2.ModelInferResponse(model_name="llm")
    for name, array in outputs.items():
        tensor = response.outputs.add(name=name, datatype=datatypes[array.dtype.type])
        tensor.shape.extend(array.shape)
        raw = serialize_byte_tensor(array).item() if array.dtype == np.object_ else array.tobytes()
        response.raw_output_contents.append(raw)
    if final:
        response.parameters["triton_final_response"].bool_param = True
    return InferResult(response)


def test_parse_streamed_response():
    chunk = parse_result(
        fake_result(
            False,
            text_output=np.array([" Emma"], dtype=np.object_),
            finish_reason=np.array([""], dtype=np.object_),
            output_ids=np.array([34, 35], dtype=np.int32),
            num_output_tokens=np.array([2], dtype=np.uint32),
            num_input_tokens=np.array([11], dtype=np.uint32),
        )
    )
    assert chunk == GenerationChunk(
        texts=(" Emma",),
        token_ids=(34, 35),
        num_output_tokens=(2,),
        finish_reasons=(None,),
        num_input_tokens=11,
        final=False,
    )
    assert chunk.num_tokens == 2 and chunk.has_content


def test_parse_empty_final_response():
    chunk = parse_result(fake_result(True))
    assert chunk.final and not chunk.has_content and chunk.num_tokens == 0 and chunk.text == ""


def test_parse_logprobs_and_cumulative():
    chunk = parse_result(
        fake_result(
            True,
            text_output=np.array(["a"], dtype=np.object_),
            cumulative_logprob=np.array([-0.5], dtype=np.float32),
            logprobs=np.array(['[{"7": -0.5}]'], dtype=np.object_),
            finish_reason=np.array(["None"], dtype=np.object_),
        )
    )
    assert chunk.cumulative_logprobs == (-0.5,)
    assert chunk.logprobs == ([{"7": -0.5}],)
    assert chunk.finish_reasons == (None,)
    assert chunk.final


def test_result_folds_n2_chunks_per_output():
    result = GenerationResult()
    result.add(GenerationChunk(texts=("a", "x"), token_ids=(1, 2, 9), num_output_tokens=(2, 1)))
    result.add(
        GenerationChunk(
            texts=("b", "y"),
            token_ids=(3, 8),
            num_output_tokens=(1, 1),
            finish_reasons=("length", "stop"),
            final=True,
        )
    )
    assert result.texts == ["ab", "xy"]
    assert result.token_ids == [[1, 2, 3], [9, 8]]
    assert result.num_output_tokens == [3, 2]
    assert result.finish_reasons == ["length", "stop"]
    assert result.num_responses == 2 and result.text == "ab" and result.finish_reason == "length"


def test_ids_without_counts_go_to_output_zero():
    chunk = GenerationChunk(texts=("a",), token_ids=(4, 5))
    assert chunk.token_ids_by_output() == [[4, 5]] and chunk.num_tokens == 2


# ---- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status,code",
    [
        ("StatusCode.INVALID_ARGUMENT", "INVALID_ARG"),
        ("INVALID_ARGUMENT", "INVALID_ARG"),
        ("StatusCode.UNAVAILABLE", "UNAVAILABLE"),
        ("StatusCode.UNIMPLEMENTED", "UNSUPPORTED"),
        ("StatusCode.DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"),
        (None, "UNKNOWN"),
    ],
)
def test_triton_code(status, code):
    assert triton_code(status) == code


def test_error_from_client_exception():
    error = TritonRequestError.from_client_exception(
        InferenceServerException("unknown key 'foo'", status="StatusCode.INVALID_ARGUMENT")
    )
    assert (error.code, error.message, str(error)) == (
        "INVALID_ARG",
        "unknown key 'foo'",
        "[INVALID_ARG] unknown key 'foo'",
    )


# ---- CLI arguments ---------------------------------------------------------------------------------------


def test_client_args():
    ns = parser().parse_args(
        [
            "client",
            "Hello",
            "--stream",
            "--max-tokens",
            "4",
            "--sampling-params",
            '{"top_k": 5, "max_tokens": 9}',
        ]
    )
    assert (ns.prompt, ns.stream, ns.url, ns.model, ns.func) == (
        "Hello",
        True,
        "localhost:8001",
        "llm",
        run_client,
    )
    assert client_sampling_params(ns) == {"top_k": 5, "max_tokens": 4}
    ns = parser().parse_args(["client", "Hi", "--url", "h:1", "--temperature", "0.5"])
    assert (ns.stream, ns.url) == (False, "h:1") and client_sampling_params(ns) == {"temperature": 0.5}


@pytest.mark.parametrize("bad", ["{", "[1]"])
def test_client_rejects_bad_sampling_json(bad):
    with pytest.raises(SystemExit):
        parser().parse_args(["client", "Hi", "--sampling-params", bad])


def test_probe_args():
    ns = parser().parse_args(["probe"])
    assert (ns.url, ns.model, ns.timeout, ns.func) == ("localhost:8001", "llm", 10.0, run_probe)


# ---- probe failures that need no server ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_fails_fast_on_closed_port(capsys):
    ns = parser().parse_args(["probe", "--url", f"localhost:{free_port()}", "--timeout", "5"])
    start = time.monotonic()
    assert ns.func(ns) == 1
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[UNAVAILABLE]" in err


def test_probe_times_out_on_silent_listener():
    """A socket that accepts TCP but never speaks (like a SIGSTOPped server) must fail by the deadline."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        start = time.monotonic()
        healthy, reason = probe(f"localhost:{listener.getsockname()[1]}", timeout=1.0)
        elapsed = time.monotonic() - start
    assert not healthy and "DEADLINE_EXCEEDED" in reason
    assert 1.0 <= elapsed < 6  # by the deadline, give or take a loaded machine, not a hang


def test_generate_times_out_on_silent_listener():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        start = time.monotonic()
        with pytest.raises(TritonRequestError) as raised:
            list(generate(f"localhost:{listener.getsockname()[1]}", "Hi", {"max_tokens": 1}, timeout=1.0))
        elapsed = time.monotonic() - start
    assert raised.value.code == "DEADLINE_EXCEEDED" and elapsed < 6


def test_client_cli_reports_connection_error(capsys):
    ns = parser().parse_args(["client", "Hi", "--url", f"localhost:{free_port()}", "--timeout", "5"])
    assert ns.func(ns) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("pagetron client: error: [UNAVAILABLE]")


# ---- against the real tritonserver -------------------------------------------------------------------

GREEDY_PROMPT = "Once upon a time, there was a little girl named"
GREEDY = {"max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def greedy(tiny_llm):
    """The served model's greedy continuation of GREEDY_PROMPT, offline (8 tokens)."""
    [out] = tiny_llm.generate(GREEDY_PROMPT, SamplingParams(**GREEDY), use_tqdm=False)
    return out.outputs[0]


def test_stream_and_non_stream_greedy_agree(triton_server, greedy):
    url = triton_server.grpc_url
    streamed = complete(url, GREEDY_PROMPT, GREEDY, stream=True, return_num_input_tokens=True)
    single = complete(url, GREEDY_PROMPT, GREEDY, stream=False)
    assert streamed.text == greedy.text and streamed.token_ids[0] == greedy.token_ids
    assert single.text == streamed.text
    assert single.token_ids == streamed.token_ids and len(single.token_ids[0]) == 8
    assert single.num_output_tokens == streamed.num_output_tokens == [8]
    assert single.finish_reasons == streamed.finish_reasons == ["length"]
    assert single.num_responses == 1 and streamed.num_responses > 1
    assert streamed.num_input_tokens == 11


def test_stream_chunks_arrive_incrementally(triton_server):
    chunks = list(generate(triton_server.grpc_url, GREEDY_PROMPT, GREEDY))
    assert sum(c.num_tokens for c in chunks) == 8
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length"


def test_token_id_prompt_and_early_break(triton_server, greedy):
    url = triton_server.grpc_url
    ids = complete(url, GREEDY_PROMPT, GREEDY).token_ids[0]
    with TritonLLMClient(url) as client:
        assert client.is_ready(timeout=5)
        streamed = client.complete(GenerateRequest(ids, GREEDY, return_num_input_tokens=True))
        single = client.complete(GenerateRequest(ids, GREEDY, stream=False))
        stream = client.generate(GenerateRequest(ids, {"max_tokens": 200, "ignore_eos": True}))
        first = next(stream)
        stream.close()  # cancels the request on the server
        again = client.complete(GenerateRequest(GREEDY_PROMPT, GREEDY, stream=False))
    assert streamed.num_input_tokens == 8
    assert single.token_ids == streamed.token_ids and single.num_output_tokens == [8]
    assert first.num_tokens >= 1
    assert again.text == greedy.text


def test_invalid_argument_surfaces_with_code(triton_server, capsys, greedy):
    url = triton_server.grpc_url
    with pytest.raises(TritonRequestError) as raised:
        list(generate(url, "Hi", {"max_tokens": 4, "bogus_key": 1}))
    assert raised.value.code == "INVALID_ARG" and "bogus_key" in raised.value.message

    async def async_error() -> TritonRequestError:
        async with AsyncTritonLLMClient(url) as client:
            try:
                await client.complete(GenerateRequest("Hi", {"max_tokens": -3}))
            except TritonRequestError as e:
                return e
        raise AssertionError("no error")

    error = asyncio.run(async_error())
    assert error.code == "INVALID_ARG" and "max_tokens" in error.message

    ns = parser().parse_args(["client", "Hi", "--url", url, "--sampling-params", '{"bogus_key": 1}'])
    assert ns.func(ns) == 1
    assert capsys.readouterr().err.startswith("pagetron client: error: [INVALID_ARG]")
    assert complete(url, GREEDY_PROMPT, GREEDY).text == greedy.text


def test_client_cli_streams_text(triton_server, capsys, tiny_llm):
    ns = parser().parse_args(
        ["client", GREEDY_PROMPT, "--stream", "--url", triton_server.grpc_url, "--max-tokens", "5"]
        + ["--temperature", "0"]
    )
    assert ns.func(ns) == 0
    [expected] = tiny_llm.generate(GREEDY_PROMPT, SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)
    assert capsys.readouterr().out == expected.outputs[0].text + "\n"


def test_probe_healthy_then_stopped_server(triton_server, capsys):
    ns = parser().parse_args(["probe", "--url", triton_server.grpc_url, "--timeout", "10"])
    assert ns.func(ns) == 0
    assert capsys.readouterr().out.startswith("ok: 'llm' ready and generated 1 token")
    assert asyncio.run(_ready(triton_server.grpc_url))

    os.kill(triton_server.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        healthy, reason = probe(triton_server.grpc_url, timeout=1.5)
        elapsed = time.monotonic() - start
    finally:
        os.kill(triton_server.pid, signal.SIGCONT)
    assert not healthy and "DEADLINE_EXCEEDED" in reason and elapsed < 6
    assert probe(triton_server.grpc_url, timeout=10)[0]


async def _ready(url: str) -> bool:
    async with AsyncTritonLLMClient(url) as client:
        return await client.is_ready(timeout=5)


def test_pagetron_probe_command_exit_status(triton_server):
    """The installed `pagetron probe` entry point, as a Kubernetes exec probe runs it."""
    pagetron = str(Path(sys.executable).parent / "pagetron")
    healthy = subprocess.run(
        [pagetron, "probe", "--url", triton_server.grpc_url], capture_output=True, text=True
    )
    assert healthy.returncode == 0 and healthy.stdout.startswith("ok:")
    closed = f"localhost:{free_port()}"
    failed = subprocess.run(
        [pagetron, "probe", "--url", closed, "--timeout", "3"], capture_output=True, text=True
    )
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith(f"{closed}: [UNAVAILABLE]") and failed.stderr.count("\n") == 1
