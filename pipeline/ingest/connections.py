"""The request head's deadline: a connection whose request line and headers do not arrive in time is closed.

aiohttp limits a head's size but not how long it may take, so a sender trickling header bytes (or opening
a connection and sending nothing) holds a connection for as long as it likes. Here the head of each request
must be complete within `head_timeout_s` of its first byte (of the connection's opening, for the first
request); otherwise the connection gets a 408 with a JSON reason and is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler


def timeout_answer(message: str) -> bytes:
    """A complete 408 response that closes the connection (written raw: no request object exists yet)."""
    body = orjson.dumps({"status": "error", "error": message})
    head = (
        "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class HeadDeadlineHandler(RequestHandler):
    """aiohttp's connection protocol, plus a timer that runs while a request head is incomplete."""

    def __init__(self, manager: web.Server, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the payload of the newest request parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        body = self._body
        if body is not None and not body.is_eof():  # the current request's body: not a head
            super().data_received(data)
            return
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._disarm()
            self._body = self._messages[-1][1] if self._messages else None
        elif data:
            self._arm()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse gets its 4xx with a JSON reason, like every other refusal."""
        response = super().handle_error(request, status, exc, message)
        if status >= 500:
            return response
        reason = f"the request cannot be parsed: {(message or '').strip()}"[:300]
        body = orjson.dumps({"status": "error", "error": reason})
        answer = web.Response(status=status, body=body, content_type="application/json")
        answer.force_close()
        return answer

    def _arm(self) -> None:
        if self._head_timer is None:
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(self._head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None:
            return
        if not self._request_in_progress:  # else an answer is being written: just close
            transport.write(
                timeout_answer(f"the request head did not arrive within {self._head_timeout_s:g} s")
            )
        self.force_close()


class DeadlineServer(web.Server):
    """aiohttp's low-level server whose connections enforce the head deadline."""

    def __init__(self, *args: Any, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout_s = head_timeout_s

    def __call__(self) -> RequestHandler:
        return HeadDeadlineHandler(self, loop=self._loop, head_timeout_s=self._head_timeout_s, **self._kwargs)
