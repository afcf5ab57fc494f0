"""The bytes the fake vLLM answers with: vLLM-shaped JSON and chunk-framed SSE, built once.

Nothing here does I/O; ``fake_vllm`` writes these buffers as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:
    import orjson

    loads: Callable[[bytes], Any] = orjson.loads
    dumps: Callable[[Any], bytes] = orjson.dumps
except ImportError:  # the fake must also run on a bare interpreter
    import json

    loads = json.loads

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


# Bursts up to this many events are cached whole; longer streams are written event by event.
MAX_CACHED_BURST_EVENTS = 4096
MAX_CACHED_BURSTS = 256

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nserver: fake-vllm\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
_DONE = b"data: [DONE]\n\n"
DONE_AND_END = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_DONE), _DONE)
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
}


@dataclass(frozen=True)
class FakeConfig:
    models: tuple[str, ...] = ("fake-model",)
    events: int = 16
    interval_ms: float = 0.0
    max_model_len: int = 8192
    token: str = " tok"
    created: int = 0


def response(status: int, body: bytes, *, close: bool = False) -> bytes:
    """A whole JSON response with Content-Length."""
    return (
        b"HTTP/1.1 %d %s\r\nserver: fake-vllm\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s\r\n%s"
    ) % (
        status,
        _REASONS.get(status, b"Error"),
        len(body),
        b"connection: close\r\n" if close else b"",
        body,
    )


def error(status: int, message: str, kind: str, *, close: bool = False) -> bytes:
    # vLLM's error envelope: clients read body["error"]["message"].
    body = dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})
    return response(status, body, close=close)


def models_body(config: FakeConfig) -> bytes:
    data: list[dict[str, Any]] = [
        {
            "id": m,
            "object": "model",
            "created": config.created,
            "owned_by": "vllm",
            "root": m,
            "parent": None,
            "max_model_len": config.max_model_len,
            "permission": [],
        }
        for m in config.models
    ]
    return dumps({"object": "list", "data": data})


def _event(obj: dict[str, Any]) -> bytes:
    payload = b"data: " + dumps(obj) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(payload), payload)  # one HTTP chunk per event, as uvicorn


class EventBytes:
    """The chunk-framed SSE events of one (endpoint, model).

    Every token event is identical, so a stream of N events is first + middle*(N-2) + last.
    """

    __slots__ = ("_bursts", "chat", "config", "first", "last", "middle", "model", "single")

    def __init__(self, *, chat: bool, model: str, config: FakeConfig) -> None:
        self.chat, self.model, self.config = chat, model, config
        self.single = self._make(role=True, finish=True)
        self.first = self._make(role=True, finish=False)
        self.middle = self._make(role=False, finish=False)
        self.last = self._make(role=False, finish=True)
        self._bursts: dict[int, bytes] = {}

    def _make(self, *, role: bool, finish: bool) -> bytes:
        head = {"created": self.config.created, "model": self.model}
        reason = "stop" if finish else None
        if self.chat:
            delta = (
                {"role": "assistant", "content": self.config.token}
                if role
                else {"content": self.config.token}
            )
            return _event(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    **head,
                    "choices": [
                        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
                    ],
                }
            )
        return _event(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                **head,
                "choices": [
                    {
                        "index": 0,
                        "text": self.config.token,
                        "logprobs": None,
                        "finish_reason": reason,
                        "stop_reason": None,
                    }
                ],
            }
        )

    def event(self, index: int, count: int) -> bytes:
        if count == 1:
            return self.single
        if index == 0:
            return self.first
        return self.last if index == count - 1 else self.middle

    def burst(self, count: int) -> bytes:
        """Head, all ``count`` (>= 1) events, [DONE] and the last chunk as one buffer."""
        cached = self._bursts.get(count)
        if cached is not None:
            return cached
        body = self.single if count == 1 else (self.first + self.middle * (count - 2) + self.last)
        data = SSE_HEAD + body + DONE_AND_END
        if count <= MAX_CACHED_BURST_EVENTS and len(self._bursts) < MAX_CACHED_BURSTS:
            self._bursts[count] = data
        return data

    def full_body(self, count: int) -> bytes:
        """The non-streaming answer: one completion holding ``count`` tokens."""
        text = self.config.token * count
        usage = {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1}
        head = {"created": self.config.created, "model": self.model, "usage": usage}
        if self.chat:
            return dumps(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "logprobs": None,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": text},
                        }
                    ],
                }
            )
        return dumps(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                **head,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": "stop",
                        "stop_reason": None,
                    }
                ],
            }
        )
