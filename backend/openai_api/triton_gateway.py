"""Everything the frontend asks Triton, over one gRPC connection: generation streams on the `llm` model,
batched embeddings on the `embed` model, and readiness. Failures raise TritonRequestError."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np

from pagetron.backend.openai_api.streams import gather_or_cancel
from pagetron.client.errors import TritonRequestError
from pagetron.client.grpc_aio_client import AsyncTritonLLMClient
from pagetron.client.probe import probe_request
from pagetron.client.request import GenerateRequest
from pagetron.client.response import GenerationChunk, GenerationResult

EMBED_BATCH = 64  # texts per Triton request: the embed model's max_batch_size
_INPUT_INDEX = re.compile(r"^input (\d+)(.*)$", re.DOTALL)  # the embed model's "input 3 has 300 tokens..."
READY_CACHE_S = 1.0  # model readiness is asked again at most this often
# the server's answers to a name that is no adapter of it (unknown, or the model serves none)
UNKNOWN_ADAPTER = ("lora_name: unknown LoRA adapter", "lora_name: this model serves no LoRA adapters")


@dataclass(frozen=True)
class ServedModels:
    llm: str = "llm"
    embed: str = "embed"
    adapters: tuple[str, ...] = ()  # LoRA adapters of the llm model, each also an OpenAI model name
    # any other name is tried as an adapter of the llm model, which the server may find in its lora_dir
    resolve_adapters: bool = False


class TritonGateway:
    def __init__(self, url: str, models: ServedModels = ServedModels()) -> None:
        self.url, self.models = url, models
        self.llm = AsyncTritonLLMClient(url, models.llm)
        self._ready: tuple[float, list[str]] | None = None
        self.resolved: dict[str, None] = {}  # adapters the server found by name (resolve_adapters), in order
        self._resolving: dict[str, asyncio.Future] = {}  # name -> its probe, shared by concurrent requests

    async def close(self) -> None:
        await self.llm.close()

    async def ready_models(self, timeout: float = 5.0, cached: bool = True) -> list[str]:
        """Which of the served models Triton reports READY (asked at most once per READY_CACHE_S when
        ``cached``); raises TritonRequestError if Triton can't answer."""
        if cached and self._ready is not None and time.monotonic() - self._ready[0] < READY_CACHE_S:
            return self._ready[1]
        names = [self.models.llm, self.models.embed]
        try:
            answers = await asyncio.gather(*(self.llm.is_ready(timeout, model=n) for n in names))
        except TritonRequestError:
            self._ready = None
            raise
        ready = [name for name, ok in zip(names, answers) if ok]
        self._ready = (time.monotonic(), ready)
        return ready

    def lora_name(self, model: str) -> str | None:
        """The adapter a request for OpenAI model ``model`` runs with (None: the base model)."""
        return model if model in self.models.adapters or model in self.resolved else None

    def adapters(self) -> list[str]:
        """The llm model's adapters that are OpenAI models: those named at start, then those resolved."""
        return [*self.models.adapters, *(a for a in self.resolved if a not in self.models.adapters)]

    async def resolve_adapter(self, name: str) -> bool:
        """Whether the server knows an adapter called ``name`` (resolve_adapters): a one-token probe under
        it, which loads it as a first request would (vLLM's resolvers load on first use too). The server
        alone decides what a name may be and where it is found; a name it does not know is not
        remembered, so an adapter added later is found by the next request for it. Concurrent requests
        for one name share one probe. Errors other than an unknown adapter (one that does not load, an
        unreachable server) raise TritonRequestError."""
        if name in self.resolved:
            return True
        probe = self._resolving.get(name)
        if probe is None:
            probe = self._resolving[name] = asyncio.ensure_future(self._probe(name))
            probe.add_done_callback(lambda done: self._probed(name, done))
        return await asyncio.shield(probe)  # a request that goes away leaves the probe to the others

    async def _probe(self, name: str) -> bool:
        try:
            await self.llm.complete(probe_request(lora_name=name))
        except TritonRequestError as e:
            if e.code == "INVALID_ARG" and e.message.startswith(UNKNOWN_ADAPTER):
                return False
            raise
        self.resolved[name] = None
        return True

    def _probed(self, name: str, probe: asyncio.Future) -> None:
        self._resolving.pop(name, None)
        if not probe.cancelled():
            probe.exception()  # retrieved, even where every waiter went away

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        return self.llm.generate(request)

    async def complete(self, request: GenerateRequest) -> GenerationResult:
        return await self.llm.complete(request)

    async def embed(self, inputs: Sequence[str | Sequence[int]]) -> tuple[np.ndarray, list[int]]:
        """Embeddings [len(inputs), dim] and each input's token count. Texts go EMBED_BATCH to a request
        and token lists one per request, all at once; Triton's dynamic batcher regroups them."""
        texts = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        groups = [texts[k : k + EMBED_BATCH] for k in range(0, len(texts), EMBED_BATCH)]
        groups += [[i] for i, x in enumerate(inputs) if not isinstance(x, str)]
        results = await gather_or_cancel([self._embed_numbered(g, inputs) for g in groups])
        vectors: list[np.ndarray | None] = [None] * len(inputs)
        counts = [0] * len(inputs)
        for group, (embeddings, tokens) in zip(groups, results):
            for row, i in enumerate(group):
                vectors[i], counts[i] = embeddings[row], tokens[row]
        return np.stack(vectors), counts

    async def _embed_group(self, group: list) -> tuple[np.ndarray, list[int]]:
        from tritonclient.grpc import InferInput

        if isinstance(group[0], str):
            tensor = InferInput("text_input", [len(group), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in group], dtype=np.object_))
        else:
            tensor = InferInput("input_ids", [1, len(group[0])], "INT32")
            tensor.set_data_from_numpy(np.asarray([group[0]], dtype=np.int32))
        result = await self.llm.infer(self.models.embed, [tensor])
        return result.as_numpy("embedding"), [int(n) for n in result.as_numpy("num_tokens").reshape(-1)]

    async def _embed_numbered(self, indexes: list[int], inputs: Sequence) -> tuple[np.ndarray, list[int]]:
        """One group; an error naming "input i" (its place in the group) names its place in ``inputs``."""
        try:
            return await self._embed_group([inputs[i] for i in indexes])
        except TritonRequestError as e:
            match = _INPUT_INDEX.match(e.message)
            if match is None or int(match.group(1)) >= len(indexes):
                raise
            message = f"input[{indexes[int(match.group(1))]}]{match.group(2)}"
            raise TritonRequestError(message, e.code) from None
