"""One exception for every failed request, carrying Triton's message and a Triton-style error code."""

from __future__ import annotations

from typing import Any

from pagetron.backend.serving.constants import untag_error

# gRPC status names -> the TRITONSERVER_Error code names the server uses in its own logs and docs.
_GRPC_TO_TRITON_CODE = {
    "INVALID_ARGUMENT": "INVALID_ARG",
    "UNIMPLEMENTED": "UNSUPPORTED",
}


def triton_code(status: str | None) -> str:
    """'StatusCode.INVALID_ARGUMENT' (tritonclient's form) or 'INVALID_ARGUMENT' -> 'INVALID_ARG'."""
    if not status:
        return "UNKNOWN"
    name = status.rsplit(".", 1)[-1].upper()
    return _GRPC_TO_TRITON_CODE.get(name, name)


class TritonRequestError(RuntimeError):
    """A generation request failed: `code` is e.g. INVALID_ARG, UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    @classmethod
    def from_client_exception(cls, exc: Any) -> TritonRequestError:
        """From tritonclient's InferenceServerException (message() and status())."""
        return cls.tagged(exc.message() or str(exc), triton_code(exc.status()))

    @classmethod
    def from_rpc_error(cls, err: Any) -> TritonRequestError:
        """From a grpc.RpcError (what grpc.aio raises while iterating a stream)."""
        return cls.tagged(err.details() or str(err), triton_code(err.code().name))

    @classmethod
    def tagged(cls, message: str, code: str) -> TritonRequestError:
        """Takes the code from a "[CODE] " prefix when the transport gave none (gRPC stream errors)."""
        tag, text = untag_error(message)
        if tag is None:
            return cls(message, code)
        return cls(text, tag if code == "UNKNOWN" else code)
