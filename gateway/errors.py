"""The errors the gateway answers itself, each rendered in OpenAI's envelope.

Clients read `body["error"]["message"]` (the openai SDK raises by status and shows that message),
so every answer the gateway makes on its own has that shape. Messages are written here, never
taken from an exception, so no backend address or internal detail can reach a client.
"""

from __future__ import annotations

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


class UpstreamUnreachable(GatewayError):
    status = 502
    type = "server_error"
    code = "backend_unreachable"


class NoHealthyReplica(GatewayError):
    status = 503
    type = "server_error"
    code = "model_unavailable"


class UpstreamTimeout(GatewayError):
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
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
