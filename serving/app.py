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
    "chroma-fetch" threads audio URLs named by requests (--allow-url-fetch), never on the prep thread (`fetch.py`)

Batching and per-row behaviour: see `engine.py`. Request reading: `requests.py`; voices: `voices.py`; settings,
errors, request schemas and audio encodings: `schemas.py`; key, body limits and connection timeouts: `http.py`.

Security: client strings are never read as paths or URLs unless the operator allows a directory (`--allow-dir`) or
URL fetching (`--allow-url-fetch`, public addresses only unless `--allow-private-urls`); every request's cost is
bounded before the expensive work (body size, messages, audio clips and seconds, prompt tokens, frames); `--api-key`
(or OPENCHROMA_API_KEY) requires `Authorization: Bearer <key>` on /v1 and the API docs; every error is OpenAI's JSON
error shape, 4xx with the offending `param` for anything the client got wrong. SIGTERM drains (`--drain-seconds`).
"""
import argparse
import asyncio
import base64
import copy
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

from ..voice_chroma import ChromaVoice
from ..processing_chroma import audio_string_kind, load_audio
from ..quantization import MODES as QUANTIZATION_MODES
from ..quantization import check_mode as check_quantization_mode
from .engine import ChromaEngine, EventBridge, GenerationJob
from .fetch import UrlFetcher
from .http import DrainingServer, GuardMiddleware, send_json, uvicorn_config  # noqa: F401  (send_json: re-exported)
from .realtime import add_realtime_arguments, realtime_settings, register_realtime
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
    fetcher = UrlFetcher(settings.url_fetch_timeout_s, settings.max_body_bytes, settings.allow_private_urls)

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()
        prep.shutdown(wait=False, cancel_futures=True)
        fetcher.shutdown()

    app = FastAPI(title="OpenChroma", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.voices = voices if voices is not None else VoiceStore(settings.voices_dir)
    app.state.answers = AnswerMemory(settings.audio_ttl_s)
    app.state.builder = RequestBuilder(engine.processor, settings, app.state.answers,
                                       engine.audio_decoder.frame_samples, thinker_prompt_limit(engine.model, settings))
    app.state.prep = prep
    app.state.fetcher = fetcher
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
    register_realtime(app)  # /v1/realtime and the voice-chat page at /
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
        message = str(error.detail) if error.status_code != 400 else "The request body could not be parsed."
        close = (error.headers or {}).get("Connection") == "close"  # the body was not read to its end
        code = getattr(error, "code", None) or codes.get(error.status_code)
        return error_response(APIError(error.status_code, message, code=code, close=close))

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        logger.exception("internal error on %s", request.url.path)
        return error_response(APIError(500, "Internal server error.", type="server_error"))


def thinker_prompt_limit(model, settings: ServerSettings) -> int:
    """Prompt tokens the thinker can take: its context, less the text tokens of the longest answer allowed."""
    config = model.config
    context = config.thinker_config.text_config.max_position_embeddings
    return context - (settings.max_frames // config.audio_frames_per_text_token + 2)


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
    names one. OpenAI's built-in names fall back to the server's default voice: --default-voice, else the one
    registered voice when there is exactly one."""
    store, default = request.app.state.voices, request.app.state.settings.default_voice
    if default is None:
        registered = store.list()
        default = registered[0]["id"] if len(registered) == 1 else None
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


async def fetch_urls(request: Request, body) -> dict:
    """Download the request's audio URLs (when allowed) on the fetch threads, before it goes to the prep thread."""
    state = request.app.state
    urls = state.builder.audio_urls(body) if state.settings.allow_url_fetch else []
    return await state.fetcher.fetch_all(urls) if urls else {}


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
    state.builder.check_chat_size(body)  # counts only: before any audio is fetched or decoded
    fetched = await fetch_urls(request, body)
    bridge = EventBridge(asyncio.get_running_loop())
    job = await prepare(request, state.builder.chat_job, body, voice, want_audio, bridge,
                        state.engine.model.generation_config, fetched)
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
        message, reply = {"role": "assistant", "content": text.text}, {}
        if want_audio:
            samples = np.concatenate(pcm_parts) if pcm_parts else np.zeros(0, np.float32)
            audio_id, expires_at = state.answers.new_id()
            state.answers.put(audio_id, expires_at, text.text)
            data = base64.b64encode(encode_audio(samples, audio_format)).decode()
            message["audio"] = {"id": audio_id, "data": data, "transcript": text.text, "expires_at": expires_at}
            if body.return_audio:  # Chroma-SGLang clients read a top-level base64 WAV
                reply["audio"] = data if audio_format == "wav" else base64.b64encode(encode_audio(samples, "wav")).decode()
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}],
                "usage": usage(text_tokens, frames), **reply}

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
    fetched = await fetch_urls(request, body)
    bridge = EventBridge(asyncio.get_running_loop())
    job = await prepare(request, state.builder.speech_job, body, voice, bridge, state.engine.model.generation_config,
                        fetched)
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
        except APIError as error:  # e.g. the server shutting down: an error event, then [DONE]
            yield sse(error_body(error.message, error.type, error.param, error.code))
            yield sse("[DONE]")
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
        source, param = await upload.read(), "audio_sample"
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    elif content_type.startswith("application/json"):
        try:
            fields = json.loads(await request.body())
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise bad_request("The request body is not valid JSON.") from None
        if not isinstance(fields, dict) or not isinstance(fields.get("audio", fields.get("audio_sample")), str):
            raise bad_request("Send {'audio': <base64 or data URI>, 'transcript': ..., 'name': ...}.", "audio")
        source, param = fields.get("audio", fields.get("audio_sample")), "audio"
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
    fetched = {}
    if isinstance(source, str) and state.settings.allow_url_fetch:
        fetched = await state.fetcher.fetch_all([(source.strip(), param)]) if is_url(source) else {}
    wave, ids = await prepare(request, state.builder.voice_reference, source, transcript.strip(), param, fetched)
    future = state.engine.call(lambda model: model.encode_voice(wave, ids, transcript=transcript.strip()))
    try:
        voice = await asyncio.wrap_future(future)
    except ValueError as error:
        raise bad_request(f"Could not encode the voice: {error}", param) from None
    info = {"id": f"voice_{secrets.token_hex(8)}", "object": "audio.voice", "name": name, "type": "audio_sample",
            "created_at": int(time.time()), "transcript": transcript.strip(),
            "duration_s": round(len(wave) / SAMPLE_RATE, 3), "frames": int(voice.codes.shape[0]), "protected": False}
    if isinstance(fields.get("consent"), str):
        info["consent"] = fields["consent"]
    await asyncio.get_running_loop().run_in_executor(None, state.voices.add, voice, info)
    return info


def is_url(text: str) -> bool:
    return audio_string_kind(text) == "url"


async def list_voices(request: Request):
    return {"object": "list", "data": request.app.state.voices.list()}


async def get_voice(request: Request, voice_id: str):
    info = request.app.state.voices.info(voice_id)
    if info is None:
        raise APIError(404, f"No voice with id {voice_id!r}.", param="voice_id", code="voice_not_found")
    return info


async def delete_voice(request: Request, voice_id: str):
    state = request.app.state
    info = state.voices.info(voice_id)
    if info is None:
        raise APIError(404, f"No voice with id {voice_id!r}.", param="voice_id", code="voice_not_found")
    if info.get("protected"):
        raise APIError(403, f"{voice_id!r} was registered by the operator; it cannot be deleted through the API.",
                       param="voice_id", code="voice_protected")
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
    condition = "draining" if status.get("draining") else "ok" if status["worker_alive"] else "starting"
    return {"status": condition, "model": state.settings.model_name, **status}


# ----------------------------------------------------------------------------------------------------------------------
# Command line: `openchroma serve`
# ----------------------------------------------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `openchroma serve`."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="hub id or local folder of a Chroma checkpoint (e.g. FlashLabs/Chroma-4B); "
                                       "default: a tiny random model (noise, for trying the API)")
    model.add_argument("--served-model-name", nargs="+", action=ServedModelNames, metavar="NAME",
                       help="the model id(s) clients send: the first is listed, the others are aliases "
                            "(default: derived from --model)")
    parser.set_defaults(served_model_aliases=())
    model.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    model.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, else float32")
    model.add_argument("--quantize", choices=list(QUANTIZATION_MODES),
                       help="load the thinker and backbone quantized (int8: CPU or CUDA; the others: CUDA; needs the "
                            "quant extra; see docs/quantization.md)")
    model.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    model.add_argument("--torch-threads", type=int, help="CPU threads for torch (default: torch's choice)")
    http = parser.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (use 0.0.0.0 to listen everywhere)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", default=os.environ.get("OPENCHROMA_API_KEY"),
                      help="require 'Authorization: Bearer KEY' on /v1 (default: $OPENCHROMA_API_KEY)")
    http.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    http.add_argument("--drain-seconds", type=float, default=10.0,
                      help="on SIGTERM: stop accepting, let answers in flight finish this long, then end them with "
                           "an error event (default 10)")
    http.add_argument("--body-timeout", type=float, default=60.0, help="seconds a request body may take (default 60)")
    http.add_argument("--header-timeout", type=float, default=10.0,
                      help="seconds a connection may take to send a request head (default 10)")
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
    limits.add_argument("--allow-private-urls", action="store_true",
                        help="with --allow-url-fetch: also fetch from loopback, private and link-local addresses")
    limits.add_argument("--url-fetch-timeout", type=float, default=15.0, help="total seconds per URL (default 15)")
    limits.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32)")
    limits.add_argument("--max-audio-seconds", type=float, default=60.0, help="longest audio clip (default 60)")
    limits.add_argument("--max-total-audio-seconds", type=float, default=120.0,
                        help="all audio clips of one request together (default 120)")
    limits.add_argument("--max-audio-parts", type=int, default=16, help="audio clips per request (default 16)")
    limits.add_argument("--max-messages", type=int, default=256, help="messages per chat request (default 256)")
    limits.add_argument("--max-prompt-tokens", type=int,
                        help="thinker prompt tokens per request (default: the thinker's context less the answer)")
    limits.add_argument("--max-instructions-chars", type=int, default=4096,
                        help="characters of /v1/audio/speech instructions (default 4096)")
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
    batching.add_argument("--max-prefill-tokens", type=int, default=4096,
                          help="padded prompt tokens prefilled together; a longer prompt is prefilled alone "
                               "(default 4096)")
    scaling = parser.add_argument_group("ray serve (needs the `ray` extra; docs/scaling.md)")
    scaling.add_argument("--ray", action="store_true", help="serve through Ray Serve: replicas behind one endpoint")
    scaling.add_argument("--replicas", type=int, default=1, help="model replicas with --ray (default 1)")
    scaling.add_argument("--min-replicas", type=int, help="autoscale with --ray: fewest replicas")
    scaling.add_argument("--max-replicas", type=int, help="autoscale with --ray: most replicas")
    scaling.add_argument("--replica-gpus", type=float, help="GPUs per replica (default: 1 with CUDA, else 0)")
    scaling.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    scaling.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)")
    add_realtime_arguments(parser)
    return parser


class ServedModelNames(argparse.Action):
    """--served-model-name A [B ...]: `served_model_name` = A (listed), `served_model_aliases` = the rest."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.served_model_name, namespace.served_model_aliases = values[0], tuple(values[1:])


def register_voice_file(model, processor, voices: VoiceStore, voice_id: str, audio_path: str, transcript_path: str):
    """Encode an operator-supplied voice (a trusted local file) and store it under `voice_id`; it is `protected`:
    the API cannot delete it."""
    if not VOICE_ID_PATTERN.match(voice_id):
        raise ValueError(f"voice id {voice_id!r} must match {VOICE_ID_PATTERN.pattern}")
    transcript = Path(transcript_path).read_text().strip()
    wave = load_audio(audio_path, SAMPLE_RATE)
    ids = processor.tokenizer(transcript, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        voice = model.encode_voice(torch.from_numpy(wave), torch.tensor(ids), transcript=transcript)
    voices.add(voice, {"id": voice_id, "object": "audio.voice", "name": voice_id, "type": "audio_sample",
                       "created_at": int(time.time()), "transcript": transcript,
                       "duration_s": round(len(wave) / SAMPLE_RATE, 3), "frames": int(voice.codes.shape[0]),
                       "protected": True})


def settings_from_args(args) -> ServerSettings:
    """`openchroma serve` options -> the server's settings (also each Ray Serve replica's: serving/ray_app.py)."""
    default_voice = args.default_voice or (args.register_voice[0][0] if args.register_voice else None)
    name = args.served_model_name or ("chroma-tiny-random" if args.model is None
                                      else Path(args.model.rstrip("/")).name.lower())
    return ServerSettings(
        model_name=name, model_aliases=tuple(a for a in (args.model, *args.served_model_aliases) if a),
        api_key=args.api_key or None, voices_dir=Path(args.voices_dir), default_voice=default_voice,
        allow_dirs=tuple(args.allow_dir), allow_url_fetch=args.allow_url_fetch,
        allow_private_urls=args.allow_private_urls, url_fetch_timeout_s=args.url_fetch_timeout,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), body_timeout_s=args.body_timeout,
        header_timeout_s=args.header_timeout, max_audio_seconds=args.max_audio_seconds,
        max_total_audio_seconds=args.max_total_audio_seconds, max_audio_parts=args.max_audio_parts,
        max_messages=args.max_messages, max_prompt_tokens=args.max_prompt_tokens,
        max_instructions_chars=args.max_instructions_chars, max_frames=args.max_frames,
        default_max_frames=min(args.default_max_frames, args.max_frames), drain_s=args.drain_seconds,
    )


def engine_from_args(model, processor, args) -> ChromaEngine:
    """`openchroma serve` options -> the engine serving `model` (also each Ray Serve replica's)."""
    return ChromaEngine(model, processor, max_batch_size=args.max_batch_size, max_active_rows=args.max_active_rows,
                        batch_window_s=args.batch_window_ms / 1000, chunk_frames=(args.chunk_frames,),
                        exact_audio=args.exact_audio, max_prefill_tokens=args.max_prefill_tokens)


def serve(args) -> int:
    """Run the server until interrupted (the `openchroma serve` entry point)."""
    if getattr(args, "ray", False):
        from .ray_app import serve_ray  # needs the `ray` extra

        return serve_ray(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    if args.model is None:
        logger.warning("no --model: serving a tiny random model (its audio is noise, its text gibberish)")
    from ..cli import load_model  # one loader for the CLI and the server (tiny random model by default)

    if args.quantize is not None:
        try:  # before the model loads
            check_quantization_mode(args.quantize, device, dtype)
        except (ValueError, ImportError) as error:
            raise SystemExit(f"--quantize {args.quantize}: {error}")
    model, processor = load_model(args.model, device, dtype, args.trust_remote_code, args.quantize)
    voices = VoiceStore(args.voices_dir)
    for voice_id, audio_path, transcript_path in args.register_voice:
        register_voice_file(model, processor, voices, voice_id, audio_path, transcript_path)
        logger.info("registered voice %r from %s", voice_id, audio_path)
    settings = settings_from_args(args)
    if settings.default_voice is not None and voices.get(settings.default_voice) is None:
        raise SystemExit(f"--default-voice {settings.default_voice!r} is not a registered voice")
    engine = engine_from_args(model, processor, args)
    app = create_app(engine, settings, voices)
    app.state.realtime = realtime_settings(args, settings.max_audio_seconds)
    logger.info("serving %r on http://%s:%d (api key %s)", settings.model_name, args.host, args.port,
                "required" if settings.api_key else "off")
    config = uvicorn_config(app, settings, args.host, args.port, log_level=args.log_level)
    DrainingServer(config, engine, settings.drain_s).run()
    return 0


def main(argv=None) -> int:
    """`python -m openchroma.serving ...` (the same options as `openchroma serve`)."""
    parser = add_serve_arguments(argparse.ArgumentParser(description="OpenAI-compatible server for Chroma"))
    return serve(parser.parse_args(argv))
