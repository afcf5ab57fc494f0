"""Which headers cross the gateway, each way.

Hop-by-hop headers (RFC 9110 7.6.1) describe one connection, not the message: the client's
connection to us and ours to the backend are different connections, so they never cross, and
neither does any header the `Connection` header names.
"""

from __future__ import annotations

from gateway.types import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the client library for the upstream request from the URL and the body it sends;
# the client's credentials are for the gateway, never for the backends.
_SET_UPSTREAM = frozenset({b"host", b"content-length", b"expect", b"authorization"})
# The backend's server banner is not the client's business. (Its Date header passes: the
# gateway does not make one of its own for proxied answers, see server.py.)
_SET_DOWNSTREAM = frozenset({b"server"})

_DROP_REQUEST = HOP_BY_HOP | _SET_UPSTREAM
_DROP_RESPONSE = HOP_BY_HOP | _SET_DOWNSTREAM

SSE_TYPE = b"text/event-stream"
NO_PROXY_BUFFERING = (b"x-accel-buffering", b"no")


def _named_by_connection(headers: Headers) -> frozenset[bytes]:
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.split(b","))
    return frozenset(names)


def request_headers(
    headers: Headers, new_request_id: str
) -> tuple[list[tuple[str, str]], str, bytes]:
    """The client's end-to-end headers for the upstream request, the request's id, and its
    W3C `traceparent` (for the access log; it is forwarded like any end-to-end header).

    The client's `X-Request-Id` is kept; a request without one gets `new_request_id`, so
    the gateway's and vLLM's logs can be matched.
    """
    drop = _DROP_REQUEST
    content_type = False
    request_id = ""
    traceparent = b""
    for name, value in headers:
        if name == b"connection":
            drop = drop | _named_by_connection(headers)
        elif name == b"content-type":
            content_type = True
        elif name == b"x-request-id":
            request_id = value.decode("latin-1")
        elif name == b"traceparent":
            traceparent = value
    forwarded = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if name not in drop
    ]
    if not content_type:
        # aiohttp would label raw bytes application/octet-stream, which vLLM's JSON
        # endpoints refuse; we have just parsed the body as JSON, so say so.
        forwarded.append(("content-type", "application/json"))
    if not request_id:
        request_id = new_request_id
        forwarded.append(("x-request-id", request_id))
    return forwarded, request_id, traceparent


def response_headers(raw: tuple[tuple[bytes, bytes], ...], request_id: str) -> tuple[Headers, bool]:
    """The backend's end-to-end headers for the client, and whether the body is an SSE stream."""
    lowered = [(name.lower(), value) for name, value in raw]
    drop = _DROP_RESPONSE
    if any(name == b"connection" for name, _ in lowered):
        drop = drop | _named_by_connection(lowered)
    headers = [(name, value) for name, value in lowered if name not in drop]
    streaming = False
    has_id = False
    for name, value in headers:
        if name == b"content-type":
            streaming = value.startswith(SSE_TYPE)
        elif name == b"x-request-id":
            has_id = True
    if streaming:
        # An nginx in front buffers responses unless told not to; tokens must not wait.
        headers.append(NO_PROXY_BUFFERING)
    if not has_id:
        headers.append((b"x-request-id", request_id.encode("latin-1")))
    return headers, streaming
