# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""HTTP hygiene in front of the routes: the API key, body size and time limits, ambiguous framing, slow heads.

`GuardMiddleware` (pure ASGI, before any route runs):
    * the API key on /v1 and on the API docs (/docs, /redoc, /openapi.json) when one is set;
    * a request with both Content-Length and Transfer-Encoding is refused (400) and its connection closed
      (RFC 9112 §6.3: the body's end is ambiguous, so nothing after it may be read as another request);
    * the body size (declared, or counted as it streams in: 413) and a total time for the body to arrive (408);
      both close the connection, since the rest of the body is left unread.

`HeadTimeoutProtocol`: uvicorn's h11 protocol, plus a deadline for each request head (a connection that sends
nothing, or drips its headers, is closed). uvicorn's own `timeout_keep_alive` closes idle kept-alive connections.

Not a hub file (needs the `server` extra).
"""

import asyncio
import hmac
import json
import time

import uvicorn
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .schemas import ServerSettings, error_body


PROTECTED_PREFIXES = ("/v1",)
API_DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


class GuardMiddleware:
    """See the module docstring."""

    def __init__(self, app, settings: ServerSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope.get("headers") or []:
            headers.setdefault(name, value)
        if b"transfer-encoding" in headers and b"content-length" in headers:
            return await send_json(send, 400, error_body(
                "A request may not carry both Content-Length and Transfer-Encoding.", code="ambiguous_framing"),
                close=True)
        key = self.settings.api_key
        if key and requires_key(scope["path"]):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return await send_json(send, 401, error_body(
                    "Missing or invalid API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"))
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await send_json(send, 400, error_body("Invalid Content-Length header."), close=True)
            if int(declared) > limit:
                return await send_json(send, 413, error_body(
                    f"Request body larger than the server's limit of {limit} bytes.", code="request_too_large"),
                    close=True)
        return await self.app(scope, BodyLimits(receive, limit, self.settings.body_timeout_s), send)


def requires_key(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES) or path in API_DOCS_PATHS


class BodyLimits:
    """`receive` with the body's size counted and its arrival bounded by a total deadline."""

    def __init__(self, receive, limit: int, timeout_s: float):
        self.receive, self.limit = receive, limit
        self.deadline = time.monotonic() + timeout_s
        self.received, self.body_done = 0, False

    async def __call__(self):
        if self.body_done:  # the body is in: what follows is waiting for a disconnect, unbounded
            return await self.receive()
        try:
            message = await asyncio.wait_for(self.receive(), max(self.deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise BodyRefused(408, "The request body did not arrive in time.", "request_timeout") from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise BodyRefused(413, f"Request body larger than the server's limit of {self.limit} bytes.",
                                  "request_too_large")
            self.body_done = not message.get("more_body", False)
        return message


class BodyRefused(HTTPException):
    """A body too slow or too large (an HTTPException, so that body parsing passes it on): the connection closes."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(status, message, headers={"Connection": "close"})
        self.code = code


async def send_json(send, status: int, body: dict, close: bool = False):
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol; a connection must complete each request head within `header_timeout_s` of opening
    (or of its previous response), else it is closed. Built by `protocol_with_head_timeout`."""

    header_timeout_s = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self.head_timer = None
        self.arm_head_timer()

    def on_response_complete(self):
        super().on_response_complete()
        self.arm_head_timer()

    def connection_lost(self, exc):
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def arm_head_timer(self):
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.header_timeout_s, self.head_timeout)

    def head_timeout(self):
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def protocol_with_head_timeout(seconds: float) -> type:
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"header_timeout_s": seconds})


def uvicorn_config(app, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, **options):
    """uvicorn's Config for `app` with the protocol and timeouts above (`openchroma serve` and the tests use it).
    The graceful-shutdown timeout leaves room for the drain (settings.drain_s) and the final error events."""
    options.setdefault("timeout_keep_alive", 5)
    return uvicorn.Config(app, host=host, port=port, http=protocol_with_head_timeout(settings.header_timeout_s),
                          timeout_graceful_shutdown=int(settings.drain_s) + 5, **options)


class DrainingServer(uvicorn.Server):
    """uvicorn's server; on SIGTERM (or Ctrl-C) the engine drains: it takes no new requests, lets the answers in
    flight finish for `drain_s`, then ends every one still running with an error (an error event and [DONE] on SSE
    streams). uvicorn meanwhile stops accepting connections and waits for the responses to end."""

    def __init__(self, config, engine, drain_s: float):
        super().__init__(config)
        self.engine, self.drain_s = engine, drain_s

    def handle_exit(self, sig, frame):
        self.engine.begin_drain(self.drain_s)
        super().handle_exit(sig, frame)
