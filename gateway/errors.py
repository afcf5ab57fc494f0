"""The errors the gateway answers itself, each rendered in OpenAI's envelope.

Clients read `body["error"]["message"]` (the openai SDK raises by status and shows that message),
so every answer the gateway makes on its own has that shape. Messages are written here, never
taken from an exception, so no backend address or internal detail can reach a client.
"""

from __future__ import annotations

from email.utils import formatdate

import orjson

from gateway.types import Send


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )

    async def send_to(self, send: Send) -> None:
        await send_json(send, self.status, self.body(), self.headers)


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class RouteNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Unauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class TooManyRequests(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_requests"


class ShuttingDown(GatewayError):
    status = 503
    type = "server_error"
    code = "shutting_down"


class UpstreamFailure(GatewayError):
    """No answer from a backend. `retryable`: safe to try another replica; `stale`: the
    backend closed a pooled connection without answering (the keep-alive race), so even the
    same replica may be tried again on a fresh connection. `kind`, for the metrics: connect,
    timeout, reset or protocol."""

    def __init__(
        self, message: str, *, retryable: bool, stale: bool = False, kind: str = "connect"
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.stale = stale
        self.kind = kind


class UpstreamUnreachable(UpstreamFailure):
    status = 502
    type = "server_error"
    code = "backend_unreachable"


class NoHealthyReplica(GatewayError):
    status = 503
    type = "server_error"
    code = "model_unavailable"


class UpstreamTimeout(UpstreamFailure):
    status = 504
    type = "server_error"
    code = "backend_timeout"


async def send_json(
    send: Send, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"date", formatdate(usegmt=True).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
