# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""OpenAI Realtime-compatible WebSocket (`/v1/realtime`) and the browser voice-chat page (`/`).

Sessions share the server's `ChromaEngine`: every response is a `GenerationJob` in the same continuous batch as
the HTTP requests. Needs the `realtime` extra (silero-vad for server VAD). docs/realtime.md has the event table.

- config.py:  operator limits, session settings, `session.update` in the GA and beta shapes
- events.py:  server event names per dialect, conversation items
- items.py:   reading client items
- session.py: one socket (buffer, VAD, conversation, responses, barge-in)
- vad.py:     silero-vad on the 24 kHz input
"""

import hmac
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .config import RealtimeError, RealtimeSettings, SessionConfig
from .events import error_event, new_id
from .session import RealtimeSession


logger = logging.getLogger("openchroma.server")
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
__all__ = ["RealtimeSettings", "RealtimeSession", "SessionConfig", "RealtimeError", "register_realtime",
           "add_realtime_arguments", "realtime_settings"]


def register_realtime(app: FastAPI, settings: RealtimeSettings = None):
    """Add `/v1/realtime`, the page at `/` and its files at `/static` to a `create_app` app (after its state is
    set). `settings` bounds sessions; `app.state.realtime` may be replaced before the server starts."""
    app.state.realtime = settings or RealtimeSettings(max_buffer_s=app.state.settings.max_audio_seconds)
    app.state.realtime_open = set()  # the sessions being served
    # silero runs in torch ops (the GIL is released): two threads serve every session's detector; each session
    # awaits its own windows in order
    app.state.vad_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="chroma-vad")
    app.add_api_websocket_route("/v1/realtime", realtime_socket)
    app.add_api_route("/", voice_chat_page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


async def voice_chat_page():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def offered_key(websocket: WebSocket) -> str:
    """The API key: `Authorization: Bearer KEY`, or (browsers cannot set headers) the subprotocol
    `openai-insecure-api-key.KEY`, as OpenAI's browser clients send it."""
    auth = websocket.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for protocol in websocket.scope.get("subprotocols") or ():
        if protocol.startswith("openai-insecure-api-key."):
            return protocol[len("openai-insecure-api-key."):]
    return ""


def dialect_of(websocket: WebSocket) -> str:
    """"beta" for clients of the preview protocol (header `OpenAI-Beta: realtime=v1` or subprotocol
    `openai-beta.realtime-v1`), else "ga"."""
    protocols = websocket.scope.get("subprotocols") or ()
    beta = "realtime=v1" in websocket.headers.get("openai-beta", "") or "openai-beta.realtime-v1" in protocols
    return "beta" if beta else "ga"


async def refuse(websocket: WebSocket, error: RealtimeError, close_code: int):
    await websocket.send_json({**error_event(error.message, error.type, error.code, error.param),
                               "event_id": new_id("event")})
    await websocket.close(code=close_code)


async def realtime_socket(websocket: WebSocket):
    state = websocket.app.state
    settings = state.settings
    if settings.api_key and not hmac.compare_digest(offered_key(websocket).encode(), settings.api_key.encode()):
        await websocket.close(code=1008, reason="Missing or invalid API key.")
        return
    protocols = websocket.scope.get("subprotocols") or ()
    await websocket.accept(subprotocol="realtime" if "realtime" in protocols else None)
    model = websocket.query_params.get("model")
    if model is not None and model != settings.model_name and model not in settings.model_aliases:
        await refuse(websocket, RealtimeError(f"The model {model!r} does not exist; this server serves "
                                              f"{settings.model_name!r}.", "model", code="model_not_found"), 1008)
        return
    if len(state.realtime_open) >= state.realtime.max_sessions:
        await refuse(websocket, RealtimeError(f"The server already serves its maximum of "
                                              f"{state.realtime.max_sessions} realtime sessions; try again later.",
                                              code="session_limit_reached", type="server_error"), 1013)
        return
    try:
        session = RealtimeSession(websocket, websocket.app, dialect_of(websocket), settings.model_name)
    except ImportError as error:  # server VAD without the realtime extra
        await refuse(websocket, RealtimeError(f"Server VAD needs silero-vad (pip install 'openchroma[realtime]'): "
                                              f"{error}", type="server_error", code="vad_unavailable"), 1011)
        return
    state.realtime_open.add(session)  # no await since the count was checked: the limit holds
    logger.info("realtime session %s opened (%s protocol)", session.id, session.dialect)
    try:
        await session.run()
    finally:
        state.realtime_open.discard(session)
        logger.info("realtime session %s closed", session.id)


def add_realtime_arguments(parser):
    """`openchroma serve` options of the realtime endpoint."""
    group = parser.add_argument_group("realtime (/v1/realtime and the page at /)")
    group.add_argument("--realtime-max-sessions", type=int, default=RealtimeSettings.max_sessions,
                       help="open realtime sockets per server (default %(default)s)")
    group.add_argument("--realtime-max-session-minutes", type=float, default=RealtimeSettings.max_session_s / 60,
                       help="a realtime session ends after this long (default %(default)s)")
    return parser


def realtime_settings(args, max_audio_seconds: float) -> RealtimeSettings:
    return RealtimeSettings(max_sessions=args.realtime_max_sessions, max_session_s=args.realtime_max_session_minutes
                            * 60, max_buffer_s=max_audio_seconds)
