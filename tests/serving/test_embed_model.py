"""Model `embed` served by the real tritonserver beside `llm`: embeddings equal SentenceEncoder's, concurrent
requests share execute() calls (dynamic batching), and a bad request gets INVALID_ARG without its
neighbours in the same call noticing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pagetron.backend.embeddings import SentenceEncoder

LONG = " ".join(["Paged attention keeps the KV cache in fixed-size blocks, allocated on demand."] * 12)
TEXTS = ["Hello world", "Triton batches concurrent requests.", "Café déjà vu 日本語 🙂", LONG]


@pytest.fixture(scope="module")
def server(triton_server):
    return triton_server  # serves llm and embed


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder(device="cpu")


def _inputs(texts: list[str | bytes] | None = None, ids: list[int] | None = None) -> list:
    inputs = []
    if texts is not None:
        tensor = grpcclient.InferInput("text_input", [len(texts), 1], "BYTES")
        raw = [t if isinstance(t, bytes) else t.encode() for t in texts]
        tensor.set_data_from_numpy(np.array(raw, dtype=np.object_).reshape(-1, 1))
        inputs.append(tensor)
    if ids is not None:
        tensor = grpcclient.InferInput("input_ids", [1, len(ids)], "INT32")
        tensor.set_data_from_numpy(np.array([ids], dtype=np.int32))
        inputs.append(tensor)
    return inputs


def _embed(target: str | grpcclient.InferenceServerClient, texts=None, ids=None) -> tuple[np.ndarray, ...]:
    client = grpcclient.InferenceServerClient(target) if isinstance(target, str) else target
    result = client.infer("embed", _inputs(texts, ids), client_timeout=60)
    return result.as_numpy("embedding"), result.as_numpy("num_tokens")


def _error(url: str, texts=None, ids=None) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        _embed(url, texts, ids)
    return info.value


def _executions(server) -> tuple[int, int]:
    """(execute() calls, requests answered) of model embed so far."""
    [stats] = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("embed").model_stats
    return stats.execution_count, stats.inference_stats.success.count + stats.inference_stats.fail.count


Call = Callable[[grpcclient.InferenceServerClient], object]


def _while_busy(server, calls: list[Call]) -> tuple[list, int]:
    """Runs ``calls`` at once while the model is busy with a slow request (32 long texts, about a second
    on two cores), so that they queue and the dynamic batcher hands them to execute() together; returns
    their results (or exceptions) and how many execute() calls served the slow request and them."""
    executions, requests = _executions(server)
    clients = [grpcclient.InferenceServerClient(server.grpc_url) for _ in calls]
    for client in clients:
        client.is_server_live()  # connected before the race, so no call loses time on its handshake
    slow = threading.Thread(target=_embed, args=(server.grpc_url, [LONG] * 32))
    slow.start()
    time.sleep(0.3)  # the slow request is in execute() now
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = calls[i](clients[i])
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in [*threads, slow]:
        t.join(60)
    deadline = time.monotonic() + 5  # statistics are updated just after the responses go out
    while _executions(server)[1] < requests + len(calls) + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    return results, _executions(server)[0] - executions


def _batched(server, calls: list[Call], enough: Callable[[int], bool]) -> tuple[list, int]:
    """_while_busy until ``enough(executions)``, at most three times: a loaded machine can still start the
    slow request late. Every attempt's results are returned to be checked, not only the grouped one's."""
    attempts = []
    for _ in range(3):
        results, executions = _while_busy(server, calls)
        attempts.append(results)
        if enough(executions):
            break
    return attempts, executions


def test_one_request_with_a_batch_of_texts(server, encoder):
    embeddings, num_tokens = _embed(server.grpc_url, TEXTS[:3])
    expected, counts = encoder.encode(TEXTS[:3])
    assert embeddings.shape == (3, 384) and embeddings.dtype == np.float32
    assert num_tokens.dtype == np.uint32 and num_tokens.tolist() == [[c] for c in counts]
    assert num_tokens[0, 0] == 4  # [CLS] hello world [SEP]
    assert ((embeddings * expected).sum(axis=1) >= 0.9999).all()
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_16_concurrent_requests_are_batched_and_answered_in_order(server, encoder):
    texts = [f"Request number {i}: {TEXTS[i % len(TEXTS)]}" for i in range(16)]
    calls = [lambda client, t=t: _embed(client, [t]) for t in texts]
    attempts, executions = _batched(server, calls, lambda executions: executions < 1 + len(texts))
    expected, counts = encoder.encode(texts)
    for results in attempts:
        for i, result in enumerate(results):
            assert not isinstance(result, Exception), result
            embedding, num_tokens = result
            assert float(embedding[0] @ expected[i]) >= 0.9999, texts[i]
            assert num_tokens.tolist() == [[counts[i]]]
    assert executions < 1 + len(texts), "the dynamic batcher grouped none of the queued requests"


def test_token_ids_embed_like_their_text(server, encoder):
    ids = encoder.tokenizer(TEXTS[1]).input_ids
    from_ids, num_tokens = _embed(server.grpc_url, ids=ids)
    from_text, _ = _embed(server.grpc_url, [TEXTS[1]])
    assert num_tokens.tolist() == [[len(ids)]]
    np.testing.assert_allclose(from_ids, from_text, atol=1e-5)


def test_too_long_text_fails_alone_in_a_shared_execute_call(server, encoder):
    too_long = "hello " * 298  # 300 tokens
    calls = [lambda client: _embed(client, ["fine", too_long]), lambda client: _embed(client, [TEXTS[0]])]
    attempts, executions = _batched(server, calls, lambda executions: executions <= 2)
    for bad, good in attempts:
        assert isinstance(bad, InferenceServerException) and bad.status() == "StatusCode.INVALID_ARGUMENT"
        assert bad.message().startswith(
            "[INVALID_ARG] input 1 has 300 tokens, more than this model's limit of 256"
        )
        assert not isinstance(good, Exception), good
        assert float(good[0][0] @ encoder.encode([TEXTS[0]])[0][0]) >= 0.9999
    assert executions <= 2, "the two requests did not share an execute() call"


@pytest.mark.parametrize(
    ("texts", "ids", "message"),
    [
        ([b"caf\xc3"], None, "input 0: text_input is not valid UTF-8"),
        (["ok", ""], None, "input 1 is empty"),
        (["both"], [101, 102], "give exactly one of text_input or input_ids"),
        (None, [101, 30522, 102], "input 0: token id 30522 is outside [0, 30522)"),
        (None, [], "input 0 is empty"),
    ],
)
def test_bad_input_gets_invalid_arg(server, texts, ids, message):
    error = _error(server.grpc_url, texts, ids)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message() == f"[INVALID_ARG] {message}"


def test_each_model_has_its_own_stub(server):
    embed, llm = server.stub_pids("embed"), server.stub_pids("llm")
    assert len(embed) == 1 and len(llm) == 1 and embed != llm
    assert sorted(embed + llm) == server.stub_pids()
    print(open(f"/proc/{embed[0]}/cmdline", "rb").read().replace(b"\0", b" ").decode())
