# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""An OpenAI-compatible HTTP server for Chroma: spoken chat, text-to-speech and cloned voices.

Not a hub file: hub files never import it, and it needs the `server` extra (fastapi, uvicorn, pydantic,
python-multipart). `openchroma serve` calls `add_serve_arguments` and `serve`; tests call `create_app` directly.

Endpoints (OpenAI's shapes; docs/server.md shows client code)::

    POST   /v1/chat/completions     messages with text and input_audio -> text + audio (message.audio / SSE delta.audio)
    POST   /v1/audio/speech         text -> speech in a voice (wav, pcm, flac, mp3, opus; chunked body or SSE events)
    POST   /v1/audio/voices         reference recording + transcript -> a reusable voice id (encoded once, on disk)
    GET    /v1/audio/voices         GET/DELETE /v1/audio/voices/{id}
    GET    /v1/models               GET /v1/models/{id}, GET /health (queue and counters)

Threads::

    event loop (uvicorn)   HTTP, validation, SSE framing, text detokenization; never touches the model
    "chroma-prep" thread   request -> model inputs: audio decoding, resampling, the processor (one thread: the
                           tokenizer is not safe to share between threads)
    "chroma-worker" thread owns the model: `ChromaEngine` runs every generation and voice encoding

Batching and per-row behaviour: see `server_engine.py`. Request reading: `server_requests.py`; settings, errors,
request schemas and audio encodings: `server_schemas.py`.

Security: client strings are never read as paths or URLs unless the operator allows a directory (`--allow-dir`) or
URL fetching (`--allow-url-fetch`); request bodies and audio durations are bounded; `--api-key` (or
OPENCHROMA_API_KEY) requires `Authorization: Bearer <key>` on /v1; every error is OpenAI's JSON error shape.
"""
import argparse
import asyncio
import base64
import copy
import hmac
import json
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..state_chroma import ChromaVoice
from ..processing_chroma import load_audio
from .engine import ChromaEngine, GenerationJob
from .requests import AnswerMemory, IncrementalText, RequestBuilder, VoiceStore
from .schemas import (
    AUDIO_FORMATS, OPENAI_VOICE_NAMES, SAMPLE_RATE, VOICE_ID_PATTERN, APIError, ChatCompletionRequest, ServerSettings,
    SpeechRequest, Voice, VoiceRef, bad_request, check_audio_format, encode_audio, error_body, error_response, pcm16,
    streaming_wav_header,
)


logger = logging.getLogger("openchroma.server")


# ----------------------------------------------------------------------------------------------------------------------
# HTTP plumbing: guard middleware, worker events on the event loop
# ----------------------------------------------------------------------------------------------------------------------


class RequestTooLarge(StarletteHTTPException):
    def __init__(self, limit):
        super().__init__(413, f"Request body larger than the server's limit of {limit} bytes.")


class GuardMiddleware:
    """Before any route runs: the API key on /v1 (when set) and the body size (Content-Length, or counted while the
    body streams in). Pure ASGI, so an oversize body is refused without being read."""

    def __init__(self, app, settings: ServerSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        key = self.settings.api_key
        if key and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return await send_json(send, 401, error_body(
                    "Missing or invalid API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"))
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                return await send_json(send, 400, error_body("Invalid Content-Length header."))
            if too_large:
                return await send_json(send, 413, error_body(
                    f"Request body larger than the server's limit of {limit} bytes.", code="request_too_large"))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(limit)
            return message

        return await self.app(scope, limited_receive, send)


async def send_json(send, status: int, body: dict):
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class EventBridge:
    """The worker's events for one request, delivered into an asyncio.Queue on the event loop."""

    def __init__(self, loop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, event):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


async def next_event(bridge: EventBridge, job: GenerationJob, request: Request):
    """The next worker event; cancels the job and raises ClientGone if the client disconnected meanwhile."""
    while True:
        try:
            event = await asyncio.wait_for(bridge.queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                raise ClientGone() from None
            if not request.app.state.engine.alive:
                raise APIError(503, "The generation worker is not running.", type="server_error") from None
            continue
        if event[0] == "error":
            raise APIError(event[1], event[2], type="invalid_request_error" if event[1] < 500 else "server_error")
        return event


class ClientGone(Exception):
    pass


def sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


# ----------------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------------


def create_app(engine: ChromaEngine, settings: Optional[ServerSettings] = None,
               voices: Optional[VoiceStore] = None) -> FastAPI:
    """The FastAPI app serving `engine`. The engine's worker starts with the app and stops with it."""
    settings = settings or ServerSettings()
    prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chroma-prep")

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()
        prep.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="OpenChroma", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.voices = voices if voices is not None else VoiceStore(settings.voices_dir)
    app.state.answers = AnswerMemory(settings.audio_ttl_s)
    app.state.builder = RequestBuilder(engine.processor, settings, app.state.answers)
    app.state.prep = prep
    app.state.detokenizer = copy.deepcopy(engine.processor.tokenizer)  # event-loop copy: tokenizers are not shared
    app.add_middleware(GuardMiddleware, settings=settings)
    add_error_handlers(app)
    router = APIRouter(prefix="/v1")
    router.add_api_route("/chat/completions", chat_completions, methods=["POST"])
    router.add_api_route("/audio/speech", create_speech, methods=["POST"])
    router.add_api_route("/audio/voices", create_voice, methods=["POST"])
    router.add_api_route("/audio/voices", list_voices, methods=["GET"])
    router.add_api_route("/audio/voices/{voice_id}", get_voice, methods=["GET"])
    router.add_api_route("/audio/voices/{voice_id}", delete_voice, methods=["DELETE"])
    router.add_api_route("/models", list_models, methods=["GET"])
    router.add_api_route("/models/{model_id:path}", get_model, methods=["GET"])
    app.include_router(router)
    app.add_api_route("/health", health, methods=["GET"])
    return app


def add_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        return error_response(validation_problem(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        codes = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return error_response(APIError(error.status_code, str(error.detail), code=codes.get(error.status_code)))

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        logger.exception("internal error on %s", request.url.path)
        return error_response(APIError(500, "Internal server error.", type="server_error"))


def validation_problem(problems: list) -> APIError:
    """pydantic's errors -> one readable 400 naming the first bad parameter (e.g. 'messages.0.role')."""
    first = problems[0] if problems else {"loc": (), "msg": "invalid request", "type": ""}
    # drop "body" and pydantic's union-member tags ('str', 'list[...]', 'VoiceRef') from the location
    loc = [str(p) for p in first.get("loc", ()) if p != "body"
           and not (isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p or p[:1].isupper()))]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        message = f"The request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})."
    elif param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        message = "The request body must be a JSON object (Content-Type: application/json)."
    elif kind == "missing":
        message = f"Missing required parameter '{param}'."
    else:
        message = f"Invalid value for '{param}': {first['msg']}." if param else f"Invalid request: {first['msg']}."
    if len(problems) > 1:
        message += f" ({len(problems) - 1} more problem(s) in the request.)"
    return bad_request(message, param, code="invalid_value")


def check_model(request: Request, name: Optional[str]):
    settings = request.app.state.settings
    if name is not None and name != settings.model_name and name not in settings.model_aliases:
        raise APIError(404, f"The model {name!r} does not exist; this server serves {settings.model_name!r}.",
                       param="model", code="model_not_found")


def resolve_voice(request: Request, voice: Optional[Voice], param: str) -> Optional[ChromaVoice]:
    """A voice id (string or {"id": ...}) -> the registered voice; None when neither the request nor the server
    names one. OpenAI's built-in names fall back to the server's default voice."""
    store, default = request.app.state.voices, request.app.state.settings.default_voice
    voice_id = voice.id if isinstance(voice, VoiceRef) else voice
    if voice_id is None:
        return store.get(default) if default else None
    found = store.get(voice_id)
    if found is None and voice_id in OPENAI_VOICE_NAMES and default:
        found = store.get(default)
    if found is None:
        known = [info["id"] for info in store.list()]
        raise bad_request(f"Unknown voice {voice_id!r}. Registered voices: {known}; create one with "
                          "POST /v1/audio/voices.", param, code="voice_not_found")
    return found


async def prepare(request: Request, build: Callable, *args) -> GenerationJob:
    """Run a RequestBuilder method on the prep thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app.state.prep, build, *args)


# -- /v1/chat/completions -----------------------------------------------------------------------------------------


async def chat_completions(request: Request, body: ChatCompletionRequest):
    state = request.app.state
    check_model(request, body.model)
    if body.tools:
        raise bad_request("Tools are not supported by Chroma.", "tools")
    if body.return_audio is False:
        want_audio = False
    elif body.modalities is not None:
        want_audio = "audio" in body.modalities
    else:  # OpenAI needs modalities; Chroma-SGLang clients ask for audio by default
        want_audio = body.audio is not None or body.return_audio is True or body.prompt_audio is not None
    audio_format = body.audio.format if body.audio is not None else "wav"
    voice = None
    if want_audio:
        check_audio_format(audio_format, "audio.format")
        voice = resolve_voice(request, body.audio.voice if body.audio else None, "audio.voice")
        if voice is None and body.prompt_audio is None:
            raise bad_request("No voice: set audio.voice to a registered voice id (GET /v1/audio/voices) or send "
                              "prompt_audio + prompt_text.", "audio.voice", code="voice_required")
    bridge = EventBridge(asyncio.get_running_loop())
    job = await prepare(request, state.builder.chat_job, body, voice, want_audio, bridge,
                        state.engine.model.generation_config)
    state.engine.submit(job)
    prompt_tokens, prompt_audio_tokens = state.builder.prompt_usage(job)
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created, model_name = int(time.time()), state.settings.model_name

    def usage(text_tokens, frames):
        frames = frames if want_audio else 0  # a text-only answer's frames are internal
        completion = text_tokens + frames
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "prompt_tokens_details": {"audio_tokens": prompt_audio_tokens,
                                          "text_tokens": prompt_tokens - prompt_audio_tokens, "cached_tokens": 0},
                "completion_tokens_details": {"audio_tokens": frames, "text_tokens": text_tokens,
                                              "reasoning_tokens": 0}}

    if not body.stream:
        try:
            text, pcm_parts = IncrementalText(state.detokenizer), []
            while True:
                event = await next_event(bridge, job, request)
                if event[0] == "delta":
                    text.feed(event[1])
                    if event[2] is not None:
                        pcm_parts.append(event[2])
                    continue
                _, reason, frames, text_tokens = event
                break
        except ClientGone:
            return Response(status_code=499)
        text.finish()
        message = {"role": "assistant", "content": text.text}
        if want_audio:
            samples = np.concatenate(pcm_parts) if pcm_parts else np.zeros(0, np.float32)
            audio_id, expires_at = state.answers.new_id()
            state.answers.put(audio_id, expires_at, text.text)
            message["audio"] = {"id": audio_id, "data": base64.b64encode(encode_audio(samples, audio_format)).decode(),
                                "transcript": text.text, "expires_at": expires_at}
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}],
                "usage": usage(text_tokens, frames)}

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    first = await first_event_or_error(bridge, job, request)

    def chunk(delta, finish_reason=None):
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    async def events():
        text = IncrementalText(state.detokenizer)
        audio_id, expires_at = state.answers.new_id()
        announce = want_audio  # the audio id goes out with the first audio delta
        try:
            yield sse(chunk({"role": "assistant", "content": "" if not want_audio else None}))
            event = first
            while True:
                if event[0] == "done":
                    break
                transcript = text.feed(event[1])
                if want_audio:
                    audio = {"transcript": transcript}
                    if event[2] is not None and len(event[2]):
                        audio["data"] = base64.b64encode(pcm16(event[2])).decode()
                    if announce:
                        audio.update(id=audio_id, expires_at=expires_at)
                        announce = False
                    yield sse(chunk({"audio": audio}))
                elif transcript:
                    yield sse(chunk({"content": transcript}))
                event = await next_event(bridge, job, request)
            _, reason, frames, text_tokens = event
            tail = text.finish()
            if tail:
                yield sse(chunk({"audio": {"transcript": tail}} if want_audio else {"content": tail}))
            if want_audio:
                state.answers.put(audio_id, expires_at, text.text)
            yield sse(chunk({}, reason))
            if include_usage:
                yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                           "model": model_name, "choices": [], "usage": usage(text_tokens, frames)})
            yield sse("[DONE]")
        except APIError as error:
            yield sse(error_body(error.message, error.type, error.param, error.code))
            yield sse("[DONE]")
        except ClientGone:
            pass
        finally:
            job.cancel.set()  # no-op when the answer is complete; frees the row when the client went away

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def first_event_or_error(bridge, job, request):
    """Wait for the first worker event before answering, so early failures get a proper status code."""
    try:
        return await next_event(bridge, job, request)
    except ClientGone:
        raise APIError(499, "Client closed the request.") from None


# -- /v1/audio/speech ---------------------------------------------------------------------------------------------


async def create_speech(request: Request, body: SpeechRequest):
    state = request.app.state
    check_model(request, body.model)
    check_audio_format(body.response_format, "response_format")
    if body.speed not in (None, 1.0):
        raise bad_request("Only speed 1.0 is supported.", "speed", code="unsupported_value")
    voice = resolve_voice(request, body.voice, "voice")
    if voice is None and not (body.prompt_audio or body.ref_audio):
        raise bad_request("No voice: set 'voice' to a registered voice id (GET /v1/audio/voices) or send "
                          "prompt_audio + prompt_text.", "voice", code="voice_required")
    bridge = EventBridge(asyncio.get_running_loop())
    job = await prepare(request, state.builder.speech_job, body, voice, bridge, state.engine.model.generation_config)
    state.engine.submit(job)
    input_tokens = int(job.forced_text_ids.numel())
    fmt = body.response_format
    streamable = fmt in ("pcm", "wav")  # the others are encoded once the audio is complete
    headers = {"X-Audio-Sample-Rate": str(SAMPLE_RATE), "Cache-Control": "no-cache"}
    first = await first_event_or_error(bridge, job, request)
    done = []  # the final ("done", reason, frames, text_tokens) event, once seen

    async def audio_pieces():
        """-> encoded pieces of the answer in `fmt` (pcm/wav as they come, other formats at the end)."""
        event, parts = first, []
        if fmt == "wav":
            yield streaming_wav_header()
        while event[0] != "done":
            if event[2] is not None and len(event[2]):
                if streamable:
                    yield pcm16(event[2])
                else:
                    parts.append(event[2])
            event = await next_event(bridge, job, request)
        if not streamable:
            yield encode_audio(np.concatenate(parts) if parts else np.zeros(0, np.float32), fmt)
        done.append(event)

    async def body_stream():
        try:
            async for piece in audio_pieces():
                yield piece
        except (APIError, ClientGone) as error:  # the status line is gone: end the body early
            logger.warning("speech stream ended early: %s", error)
        finally:
            job.cancel.set()

    async def sse_stream():
        try:
            async for piece in audio_pieces():
                yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()})
            frames = done[0][2]
            yield sse({"type": "speech.audio.done",
                       "usage": {"input_tokens": input_tokens, "output_tokens": frames,
                                 "total_tokens": input_tokens + frames}})
        except APIError as error:
            yield sse(error_body(error.message, error.type, error.param, error.code))
        except ClientGone:
            pass
        finally:
            job.cancel.set()

    if body.stream_format == "sse":
        return StreamingResponse(sse_stream(), media_type="text/event-stream", headers=headers)
    return StreamingResponse(body_stream(), media_type=AUDIO_FORMATS[fmt][2], headers=headers)


# -- /v1/audio/voices ---------------------------------------------------------------------------------------------


async def create_voice(request: Request):
    """multipart/form-data: audio_sample (file; also `file`/`audio`), transcript (also `prompt_text`/`text`), name.
    Or JSON: {"audio": base64 | data URI, "transcript": ..., "name": ...}."""
    state = request.app.state
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=4, max_fields=20)
        upload = next((form[k] for k in ("audio_sample", "file", "audio") if k in form), None)
        if upload is None or isinstance(upload, str):
            raise bad_request("Upload the reference recording as the file field 'audio_sample'.", "audio_sample")
        data = await upload.read()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    elif content_type.startswith("application/json"):
        try:
            fields = json.loads(await request.body())
        except ValueError as error:
            raise bad_request(f"The request body is not valid JSON: {error}.") from None
        if not isinstance(fields, dict) or not isinstance(fields.get("audio", fields.get("audio_sample")), str):
            raise bad_request("Send {'audio': <base64 or data URI>, 'transcript': ..., 'name': ...}.", "audio")
        data = await prepare(request, state.builder.audio_bytes, fields.get("audio", fields.get("audio_sample")),
                             "audio")
    else:
        raise APIError(415, "Send multipart/form-data (audio_sample + transcript) or JSON.", code="unsupported_media")
    transcript = next((fields[k] for k in ("transcript", "prompt_text", "text", "ref_text") if fields.get(k)), None)
    if not isinstance(transcript, str) or not transcript.strip():
        raise bad_request("'transcript' is required: the exact words spoken in the recording.", "transcript")
    if len(transcript) > state.settings.max_input_chars:
        raise bad_request(f"'transcript' is longer than {state.settings.max_input_chars} characters.", "transcript")
    name = fields.get("name") or "voice"
    if not isinstance(name, str) or len(name) > 256:
        raise bad_request("'name' must be a string of at most 256 characters.", "name")
    wave, ids = await prepare(request, reference_from_bytes, state.builder, data, transcript.strip())
    future = state.engine.call(lambda model: model.encode_voice(wave, ids, transcript=transcript.strip()))
    try:
        voice = await asyncio.wrap_future(future)
    except ValueError as error:
        raise bad_request(f"Could not encode the voice: {error}", "audio_sample") from None
    info = {"id": f"voice_{secrets.token_hex(8)}", "object": "audio.voice", "name": name, "type": "audio_sample",
            "created_at": int(time.time()), "transcript": transcript.strip(),
            "duration_s": round(len(wave) / SAMPLE_RATE, 3), "frames": int(voice.codes.shape[0])}
    if isinstance(fields.get("consent"), str):
        info["consent"] = fields["consent"]
    await asyncio.get_running_loop().run_in_executor(None, state.voices.add, voice, info)
    return info


def reference_from_bytes(builder: RequestBuilder, data: bytes, transcript: str):
    wave = builder.waveform(data, SAMPLE_RATE, "audio_sample")
    ids = builder.tokenizer(transcript, add_special_tokens=False)["input_ids"]
    return torch.from_numpy(wave), torch.tensor(ids, dtype=torch.long)


async def list_voices(request: Request):
    return {"object": "list", "data": request.app.state.voices.list()}


async def get_voice(request: Request, voice_id: str):
    info = request.app.state.voices.info(voice_id)
    if info is None:
        raise APIError(404, f"No voice with id {voice_id!r}.", param="voice_id", code="voice_not_found")
    return info


async def delete_voice(request: Request, voice_id: str):
    state = request.app.state
    if state.voices.info(voice_id) is None:
        raise APIError(404, f"No voice with id {voice_id!r}.", param="voice_id", code="voice_not_found")
    if voice_id == state.settings.default_voice:
        raise bad_request(f"{voice_id!r} is the server's default voice; it cannot be deleted.", "voice_id")
    await asyncio.get_running_loop().run_in_executor(None, state.voices.delete, voice_id)
    return {"id": voice_id, "object": "audio.voice.deleted", "deleted": True}


# -- models, health ----------------------------------------------------------------------------------------------


def model_card(settings: ServerSettings) -> dict:
    return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "openchroma"}


async def list_models(request: Request):
    return {"object": "list", "data": [model_card(request.app.state.settings)]}


async def get_model(request: Request, model_id: str):
    check_model(request, model_id)
    return model_card(request.app.state.settings)


async def health(request: Request):
    state = request.app.state
    status = state.engine.status()
    return {"status": "ok" if status["worker_alive"] else "starting", "model": state.settings.model_name, **status}


# ----------------------------------------------------------------------------------------------------------------------
# Command line: `openchroma serve`
# ----------------------------------------------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `openchroma serve`."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="hub id or local folder of a Chroma checkpoint (e.g. FlashLabs/Chroma-4B); "
                                       "default: a tiny random model (noise, for trying the API)")
    model.add_argument("--served-model-name", help="the model id clients send (default: derived from --model)")
    model.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    model.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, else float32")
    model.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    model.add_argument("--torch-threads", type=int, help="CPU threads for torch (default: torch's choice)")
    http = parser.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (use 0.0.0.0 to listen everywhere)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", default=os.environ.get("OPENCHROMA_API_KEY"),
                      help="require 'Authorization: Bearer KEY' on /v1 (default: $OPENCHROMA_API_KEY)")
    http.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    voices = parser.add_argument_group("voices")
    voices.add_argument("--voices-dir", default=str(Path.home() / ".cache" / "openchroma" / "voices"),
                        help="where uploaded voices are kept (default: ~/.cache/openchroma/voices)")
    voices.add_argument("--register-voice", nargs=3, action="append", default=[],
                        metavar=("ID", "AUDIO", "TRANSCRIPT_FILE"),
                        help="encode a voice at startup under this id (repeatable), e.g. "
                             "--register-voice nova examples/voice.wav examples/voice.txt")
    voices.add_argument("--default-voice", help="voice id used when a request names none or an OpenAI built-in "
                                                "name (alloy, ...); default: the first --register-voice")
    limits = parser.add_argument_group("security and limits")
    limits.add_argument("--allow-dir", action="append", default=[],
                        help="let prompt_audio name files inside this directory (repeatable; off by default)")
    limits.add_argument("--allow-url-fetch", action="store_true", help="let requests name http(s) audio URLs")
    limits.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32)")
    limits.add_argument("--max-audio-seconds", type=float, default=60.0, help="longest audio clip (default 60)")
    limits.add_argument("--max-frames", type=int, default=2000, help="most audio frames a request may ask for")
    limits.add_argument("--default-max-frames", type=int, default=1000,
                        help="audio frames when a request sets none (80 ms each; default 1000 = 80 s)")
    batching = parser.add_argument_group("batching")
    batching.add_argument("--max-batch-size", type=int, default=16,
                          help="requests prefilled together when they join the running batch (default 16)")
    batching.add_argument("--max-active-rows", type=int, default=64,
                          help="requests decoding at once in the running batch; the rest wait (default 64)")
    batching.add_argument("--batch-window-ms", type=float, default=10.0,
                          help="how long an idle server waits to batch requests that arrive together")
    batching.add_argument("--chunk-frames", type=int, default=2, help="audio frames per streamed chunk")
    batching.add_argument("--exact-audio", action="store_true",
                          help="decode each request's audio alone: bit-identical under load, slower on a GPU")
    return parser


def register_voice_file(model, processor, voices: VoiceStore, voice_id: str, audio_path: str, transcript_path: str):
    """Encode an operator-supplied voice (a trusted local file) and store it under `voice_id`."""
    if not VOICE_ID_PATTERN.match(voice_id):
        raise ValueError(f"voice id {voice_id!r} must match {VOICE_ID_PATTERN.pattern}")
    transcript = Path(transcript_path).read_text().strip()
    wave = load_audio(audio_path, SAMPLE_RATE)
    ids = processor.tokenizer(transcript, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        voice = model.encode_voice(torch.from_numpy(wave), torch.tensor(ids), transcript=transcript)
    voices.add(voice, {"id": voice_id, "object": "audio.voice", "name": voice_id, "type": "audio_sample",
                       "created_at": int(time.time()), "transcript": transcript,
                       "duration_s": round(len(wave) / SAMPLE_RATE, 3), "frames": int(voice.codes.shape[0])})


def serve(args) -> int:
    """Run the server until interrupted (the `openchroma serve` entry point)."""
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    if args.model is None:
        logger.warning("no --model: serving a tiny random model (its audio is noise, its text gibberish)")
    from ..cli import load_model  # one loader for the CLI and the server (tiny random model by default)

    model, processor = load_model(args.model, device, dtype, args.trust_remote_code)
    voices = VoiceStore(args.voices_dir)
    for voice_id, audio_path, transcript_path in args.register_voice:
        register_voice_file(model, processor, voices, voice_id, audio_path, transcript_path)
        logger.info("registered voice %r from %s", voice_id, audio_path)
    default_voice = args.default_voice or (args.register_voice[0][0] if args.register_voice else None)
    if default_voice is not None and voices.get(default_voice) is None:
        raise SystemExit(f"--default-voice {default_voice!r} is not a registered voice")
    name = args.served_model_name or ("chroma-tiny-random" if args.model is None
                                      else Path(args.model.rstrip("/")).name.lower())
    settings = ServerSettings(
        model_name=name, model_aliases=tuple(a for a in (args.model,) if a), api_key=args.api_key or None,
        voices_dir=Path(args.voices_dir), default_voice=default_voice, allow_dirs=tuple(args.allow_dir),
        allow_url_fetch=args.allow_url_fetch, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_audio_seconds=args.max_audio_seconds, max_frames=args.max_frames,
        default_max_frames=min(args.default_max_frames, args.max_frames),
    )
    engine = ChromaEngine(model, processor, max_batch_size=args.max_batch_size, max_active_rows=args.max_active_rows,
                          batch_window_s=args.batch_window_ms / 1000, chunk_frames=(args.chunk_frames,),
                          exact_audio=args.exact_audio)
    app = create_app(engine, settings, voices)
    logger.info("serving %r on http://%s:%d (api key %s)", name, args.host, args.port,
                "required" if settings.api_key else "off")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def main(argv=None) -> int:
    """`python -m openchroma.serving ...` (the same options as `openchroma serve`)."""
    parser = add_serve_arguments(argparse.ArgumentParser(description="OpenAI-compatible server for Chroma"))
    return serve(parser.parse_args(argv))
