"""Pagetron as a decoupled Triton Python-backend model (model_repository/llm/1/model.py re-exports this).

auto_complete_config() declares the tensors of serving/schema.py and the decoupled policy (config.pbtxt
lists none, as with Triton's vLLM backend); initialize() builds the engine from engine_args.json next to
model.py and warms it up (a real one-token generation) before the model may report READY; execute()
validates and queues, returning at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import uuid
from pathlib import Path

import triton_python_backend_utils as pb_utils

from pagetron.backend.core.config import ConfigError, EngineConfig
from pagetron.backend.core.errors import InvalidRequestError
from pagetron.backend.core.sampling_params import SamplingParams, SamplingParamsError
from pagetron.backend.engine.llm_engine import LLMEngine
from pagetron.backend.engine.outputs import RequestOutput
from pagetron.backend.serving import schema
from pagetron.backend.serving.async_engine import AsyncEngine, ResponseSink
from pagetron.backend.serving.constants import (
    DRAIN_FILE,
    ENGINE_ARGS_FILE,
    MULTI_LORA_JSON,
    SELF_UNLOAD_FILE,
    VLLM_MODEL_JSON,
    ErrorCode,
    tag_error,
)
from pagetron.backend.serving.fault_injection import fault_injection_factory
from pagetron.backend.serving.request_parser import ParsedRequest, parse_request
from pagetron.backend.serving.responses import ResponseBuilder
from pagetron.backend.serving.triton_metrics import TritonMetrics
from pagetron.backend.serving.vllm_compat import read_model_json

WARMUP_TIMEOUT_S = 600.0


class _TritonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        else:
            pb_utils.Logger.log_info(message)


class TritonSink(ResponseSink):
    """One request's response sender. Streaming sends each delta; otherwise deltas are joined, sent once."""

    def __init__(self, sender, parsed: ParsedRequest, builder: ResponseBuilder):
        self.sender, self.parsed, self.builder = sender, parsed, builder
        self.pending: RequestOutput | None = None
        # NOTE: the final response frees the request's response factory inside Triton, and is_cancelled()
        # on it afterwards segfaults tritonserver (seen under a perf_analyzer soak). The cancellation
        # poller and the output thread race, so the final send and every poll take this lock.
        self._lock = threading.Lock()
        self._closed = False

    def is_cancelled(self) -> bool:
        with self._lock:
            return not self._closed and self.sender.is_cancelled()

    def send(self, output: RequestOutput, final: bool) -> None:
        if not self.parsed.stream:
            self.pending = self.builder.merge(self.pending, output)
            if not final:
                return
            output = self.pending
        tensors = [pb_utils.Tensor(k, v) for k, v in self.builder.tensors(self.parsed, output).items()]
        response = pb_utils.InferenceResponse(output_tensors=tensors)
        if not final:
            self.sender.send(response, flags=0)
            return
        with self._lock:
            self._closed = True
            self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def send_error(self, message: str, code: str) -> None:
        error = pb_utils.TritonError(tag_error(message, code), _triton_error_code(code))
        with self._lock:
            self._closed = True
            self.sender.send(
                pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """The tensors of the schema and the decoupled policy; a config.pbtxt that names a tensor must
        agree with the schema on its type and dims (Triton checks)."""
        for tensor in schema.INPUTS:
            auto_complete_model_config.add_input(tensor.model_config(is_input=True))
        for tensor in schema.OUTPUTS:
            auto_complete_model_config.add_output(tensor.model_config(is_input=False))
        auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
        auto_complete_model_config.set_max_batch_size(0)
        return auto_complete_model_config

    def initialize(self, args: dict) -> None:
        logging.getLogger("pagetron").addHandler(_TritonLogHandler())
        logging.getLogger("pagetron").setLevel(logging.INFO)
        self.model_name = args["model_name"]
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("model 'llm' must use the decoupled transaction policy")
        parameters = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        config = _engine_config(os.path.join(args["model_repository"], args["model_version"]))
        self.engine = LLMEngine(config, executor_factory=fault_injection_factory())
        self.builder = ResponseBuilder(self.engine.tokenizer)
        self.metrics = _optional_metrics(self.model_name, args["model_version"], self.engine.max_model_len)
        self.async_engine = AsyncEngine(
            self.engine,
            stall_timeout_s=float(parameters.get("stall_timeout_s", "30")),
            on_step=self.metrics.record if self.metrics else None,
            on_unhealthy=self._unload_self,
            drain_file=os.path.join(args["model_repository"], DRAIN_FILE),
            drain_grace_s=float(parameters.get("drain_grace_s", "20")),
            max_queued_requests=_queue_limit(parameters.get("max_queued_requests", "1024")),
        )
        self.async_engine.start()
        self._warm_up()

    def _warm_up(self) -> None:
        """A real one-token generation through the whole serving path: READY means a token came out."""
        done = threading.Event()
        result: dict = {}

        class WarmupSink(ResponseSink):
            def is_cancelled(self) -> bool:
                return False

            def send(self, output: RequestOutput, final: bool) -> None:
                if final:
                    result["output"] = output
                    done.set()

            def send_error(self, message: str, code: str) -> None:
                result["error"] = message
                done.set()

        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        prompt = "Hello" if self.engine.tokenizer is not None else [1]
        self.async_engine.submit("warmup", ParsedRequest(prompt=prompt, params=params), WarmupSink())
        if not done.wait(WARMUP_TIMEOUT_S) or "error" in result:
            self.async_engine.shutdown()
            raise pb_utils.TritonModelException(
                f"warm-up generation failed: {result.get('error', 'timeout')}"
            )
        import torch

        pb_utils.Logger.log_info(
            f"pagetron: warm-up generated a token; ready ({self.engine.executor.device_name}, "
            f"{torch.get_num_threads()} torch threads, {self.engine.block_manager.num_blocks} KV blocks)"
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {}
                for name in schema.INPUT_NAMES:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                parsed = parse_request(inputs, request.parameters())
            except (InvalidRequestError, SamplingParamsError) as e:
                error = pb_utils.TritonError(
                    tag_error(str(e), ErrorCode.INVALID_ARG), pb_utils.TritonError.INVALID_ARG
                )
                sender.send(
                    pb_utils.InferenceResponse(error=error),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
                continue
            sink = TritonSink(sender, parsed, self.builder)
            self.async_engine.submit(uuid.uuid4().hex, parsed, sink)
        return None

    def _unload_self(self, reason: str) -> None:
        # Takes effect under --model-control-mode=explicit: the model stops being READY; elsewhere it is
        # still reported unhealthy through every request's UNAVAILABLE error. The marker, written first
        # (so it exists before readiness drops), tells `pagetron serve` to reload the model; an
        # operator's unload leaves none, so serve leaves that one alone.
        try:
            marker = os.path.join(os.path.dirname(self.async_engine.drain_file), SELF_UNLOAD_FILE)
            with open(marker + ".tmp", "w") as f:
                json.dump({"pid": os.getpid(), "reason": reason}, f)
            os.replace(marker + ".tmp", marker)
        except (OSError, TypeError) as e:  # TypeError: no drain file (never under Triton)
            pb_utils.Logger.log_warn(f"pagetron: could not write the self-unload marker: {e}")
        try:
            pb_utils.unload_model(self.model_name)
        except Exception as e:  # e.g. not in explicit model-control mode
            pb_utils.Logger.log_warn(f"pagetron: could not unload model after '{reason}': {e}")

    def finalize(self) -> None:
        self.async_engine.shutdown()
        self.engine.shutdown()
        if self.metrics is not None:
            self.metrics.close()
        del self.engine, self.async_engine
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def _engine_config(version_dir: str) -> EngineConfig:
    """engine_args.json; else a vLLM-backend model.json; else the defaults (the bundled model). A
    multi_lora.json beside it (the vLLM backend's: {"name": "PEFT folder"}) adds to lora_modules."""
    own, vllm = os.path.join(version_dir, ENGINE_ARGS_FILE), Path(version_dir, VLLM_MODEL_JSON)
    if os.path.exists(own):
        config = EngineConfig.from_json_file(own)
    elif vllm.exists():
        config = read_model_json(vllm)
    else:
        config = EngineConfig()
    multi_lora = Path(version_dir, MULTI_LORA_JSON)
    if multi_lora.exists():
        try:
            modules = json.loads(multi_lora.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError("<file>", f"{multi_lora} is not valid JSON: {e}") from None
        if not isinstance(modules, dict):
            raise ConfigError("<file>", f"{multi_lora} must map adapter names to PEFT folders")
        config = dataclasses.replace(config, lora_modules={**modules, **(config.lora_modules or {})})
    return config


def _queue_limit(value: str) -> int | None:
    """Model parameter max_queued_requests: a count >= 0, or "none" for an unbounded queue."""
    if value.strip().lower() == "none":
        return None
    try:
        limit = int(value)
    except ValueError:
        limit = -1
    if limit < 0:
        raise pb_utils.TritonModelException(
            f"parameter max_queued_requests: expected a count >= 0 or 'none', got {value!r}"
        )
    return limit


def _triton_error_code(code: str) -> int:
    # pb_utils gets its C++ attributes only after model.py is imported: look them up lazily
    return getattr(pb_utils.TritonError, code)


def _optional_metrics(model_name: str, version: str, max_model_len: int) -> TritonMetrics | None:
    try:
        return TritonMetrics({"model": model_name, "version": version}, max_model_len)
    except pb_utils.TritonModelException as e:
        if "metrics not supported" in str(e).lower():
            pb_utils.Logger.log_info("pagetron: metrics are disabled on this server")
            return None
        raise


__all__ = ["TritonPythonModel"]
