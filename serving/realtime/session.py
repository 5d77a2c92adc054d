# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""One Realtime socket: its settings, input audio buffer, server VAD, conversation and the response in progress.

Everything here runs on the event loop, one client event at a time (`handle`); the response in progress is an
asyncio task that reads the engine's events for its `GenerationJob` and turns them into server events. All server
events go out through one queue and one writer task, in order.

Turn taking (server VAD): speech start -> `input_audio_buffer.speech_started` (and, while a response is playing,
barge-in: the response is cancelled at once and its row leaves the engine's batch after the current frame);
speech stop -> `speech_stopped`, the buffer up to there becomes a user item, and a response starts.
"""

import asyncio
import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import List, Optional

import numpy as np

from fastapi import WebSocketDisconnect

from ..engine import EventBridge, GenerationJob
from ..requests import IncrementalText, sampling_params
from ..schemas import OPENAI_VOICE_NAMES, APIError, pcm16
from .config import (
    SAMPLE_RATE, RealtimeError, SessionConfig, apply_session_update, expect, read_max_tokens, read_modalities,
    read_sampling, session_json,
)
from .events import Item, error_event, event_name, new_id, pcm16_to_float
from .items import read_item
from .vad import ServerVAD


logger = logging.getLogger("openchroma.server")
MS = SAMPLE_RATE // 1000  # samples per millisecond


@dataclass
class Response:
    """The response in progress (at most one per session)."""

    id: str
    item: Item
    modalities: tuple
    conversation: bool  # False: out-of-band (`conversation: "none"`), its item is not kept
    max_frames: int
    text: IncrementalText
    job: Optional[GenerationJob] = None
    task: Optional[asyncio.Task] = None
    usage: dict = field(default_factory=dict)
    metadata: Optional[dict] = None
    done: bool = False

    def to_json(self, status: str, dialect: str, details: Optional[dict] = None, output: bool = True) -> dict:
        return {"id": self.id, "object": "realtime.response", "status": status, "status_details": details,
                "output": [self.item.to_json(dialect)] if output else [], "conversation_id": None,
                "output_modalities": list(self.modalities), "max_output_tokens": self.max_frames,
                "metadata": self.metadata, "usage": self.usage or None}


class RealtimeSession:
    def __init__(self, websocket, app, dialect: str, model_name: str):
        state = app.state
        self.ws, self.state, self.dialect = websocket, state, dialect
        self.limits = state.realtime
        self.id = new_id("sess")
        self.config = SessionConfig(model=model_name, voice=state.settings.default_voice)
        self.expires_at = int(time.time() + self.limits.max_session_s)
        self.items: List[Item] = []
        self.buffer = np.zeros(0, dtype=np.float32)  # input audio not yet committed, 24 kHz
        self.buffer_start = 0  # absolute position (samples since the session began) of buffer[0]
        self.vad = self.new_vad(self.config)
        self.speech: Optional[dict] = None  # {"item_id", "start"} while the user speaks (server VAD)
        self.response: Optional[Response] = None
        self.audio_started = False  # the voice is fixed once audio went out
        self.outbox: asyncio.Queue = asyncio.Queue()

    @staticmethod
    def new_vad(config: SessionConfig) -> Optional[ServerVAD]:
        detection = config.turn_detection
        return ServerVAD(detection.threshold, detection.silence_duration_ms) if detection is not None else None

    # -- the socket ------------------------------------------------------------------------------------------------

    async def run(self):
        writer = asyncio.create_task(self.write_loop())
        expiry = asyncio.get_running_loop().call_later(self.limits.max_session_s, self.expire)
        self.emit("session.created", session=self.session_json())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    text = (message.get("bytes") or b"").decode("utf-8", errors="replace")
                await self.handle(text)
        finally:
            expiry.cancel()
            self.abandon_response()
            await asyncio.sleep(0)  # let the writer flush what it can
            writer.cancel()

    async def write_loop(self):
        try:
            while True:
                payload = await self.outbox.get()
                if payload is None:
                    await self.ws.close(code=1000)
                    return
                await self.ws.send_text(json.dumps(payload))
        except (WebSocketDisconnect, RuntimeError):  # the client is gone: the reader ends the session
            return

    def emit(self, name: str, **fields):
        name = event_name(name, self.dialect)
        if name is not None:
            self.outbox.put_nowait({"type": name, "event_id": new_id("event"), **fields})

    def error(self, error: RealtimeError, event_id: Optional[str]):
        payload = error_event(error.message, error.type, error.code, error.param, event_id)
        self.outbox.put_nowait({**payload, "event_id": new_id("event")})

    def expire(self):
        self.error(RealtimeError(f"The session reached its maximum duration of {self.limits.max_session_s:g} s.",
                                 code="session_expired"), None)
        self.abandon_response()
        self.outbox.put_nowait(None)

    def session_json(self) -> dict:
        return session_json(self.config, self.id, self.dialect, self.expires_at)

    # -- client events -------------------------------------------------------------------------------------------

    async def handle(self, text: str):
        event_id = None
        try:
            if len(text) > self.limits.max_event_bytes:
                raise RealtimeError(f"Client event larger than {self.limits.max_event_bytes} bytes.",
                                    code="event_too_large")
            try:
                event = json.loads(text)
            except ValueError as error:
                raise RealtimeError(f"The client event is not valid JSON: {error}.", code="invalid_json") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise RealtimeError("A client event must be a JSON object with a string 'type'.", "type",
                                    code="invalid_event")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            handler = HANDLERS.get(event["type"])
            if handler is None:
                raise RealtimeError(f"Unknown client event type {event['type']!r}; supported: {sorted(HANDLERS)}.",
                                    "type", code="unknown_event")
            await handler(self, event)
        except RealtimeError as error:
            self.error(error, event_id)
        except APIError as error:
            self.error(RealtimeError(error.message, error.param, error.code, error.type), event_id)
        except Exception:  # a bug must not end the session: report it and carry on
            logger.exception("realtime session %s: handling a client event failed", self.id)
            self.error(RealtimeError("Internal server error.", code="internal_error", type="server_error"), event_id)

    async def session_update(self, event: dict):
        settings = self.state.settings
        new = apply_session_update(self.config, event.get("session"), settings.max_frames)
        if new.voice != self.config.voice:
            self.voice(new.voice, "session.audio.output.voice")  # an unknown voice is refused here
            if self.audio_started:
                raise RealtimeError("The voice cannot change once the session has produced audio.",
                                    "session.audio.output.voice", code="cannot_update_voice")
        if new.turn_detection != self.config.turn_detection:
            self.vad = self.new_vad(new)
            self.speech = None
        self.config = new
        self.emit("session.updated", session=self.session_json())

    def voice(self, voice_id: Optional[str], param: str):
        """A voice id -> the registered ChromaVoice (OpenAI's built-in names: the server's default voice)."""
        store, default = self.state.voices, self.state.settings.default_voice
        found = store.get(voice_id) if voice_id is not None else None
        if found is None and (voice_id is None or voice_id in OPENAI_VOICE_NAMES) and default:
            found = store.get(default)
        if found is None:
            known = [info["id"] for info in store.list()]
            raise RealtimeError(f"Unknown voice {voice_id!r}. Registered voices: {known}; create one with "
                                "POST /v1/audio/voices.", param, code="voice_not_found")
        return found

    # -- input audio ----------------------------------------------------------------------------------------------

    async def buffer_append(self, event: dict):
        audio = expect(event.get("audio"), str, "audio", "a base64 string of PCM16 24 kHz audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError("'audio' is not valid base64.", "audio", code="invalid_base64") from None
        if len(data) % 2:
            raise RealtimeError("'audio' must hold whole 16-bit samples (an even number of bytes).", "audio")
        samples = pcm16_to_float(data)
        limit = int(self.limits.max_buffer_s * SAMPLE_RATE)
        if len(self.buffer) + len(samples) > limit:
            raise RealtimeError(f"The input audio buffer would exceed {self.limits.max_buffer_s:g} s; commit or "
                                "clear it.", "audio", code="input_audio_buffer_full")
        self.buffer = np.concatenate([self.buffer, samples])
        if self.vad is not None:
            loop = asyncio.get_running_loop()
            for kind, position in await loop.run_in_executor(self.state.vad_pool, self.vad.feed, samples):
                self.on_speech_start(position) if kind == "start" else self.on_speech_stop(position)
            if self.speech is None:  # idle: keep only what a speech start could reach back to
                self.trim_buffer(self.vad.position - self.config.turn_detection.prefix_padding_ms * MS)

    def trim_buffer(self, position: int):
        drop = min(max(position - self.buffer_start, 0), len(self.buffer))
        self.buffer, self.buffer_start = self.buffer[drop:], self.buffer_start + drop

    def on_speech_start(self, position: int):
        start = max(self.buffer_start, position - self.config.turn_detection.prefix_padding_ms * MS)
        self.speech = {"item_id": new_id("item"), "start": start}
        self.emit("input_audio_buffer.speech_started", audio_start_ms=start // MS, item_id=self.speech["item_id"])
        if self.response is not None and self.config.turn_detection.interrupt_response:
            self.cancel_response("turn_detected")  # barge-in

    def on_speech_stop(self, position: int):
        if self.speech is None:
            return
        speech, self.speech = self.speech, None
        self.emit("input_audio_buffer.speech_stopped", audio_end_ms=position // MS, item_id=speech["item_id"])
        self.trim_buffer(speech["start"])
        audio = self.buffer[: position - self.buffer_start]
        self.trim_buffer(position)
        self.commit(audio, speech["item_id"])
        if self.config.turn_detection.create_response and self.response is None:
            self.start_response({})

    async def buffer_commit(self, event: dict):
        if len(self.buffer) < 100 * MS:
            raise RealtimeError(f"Buffer too small: at least 100 ms of audio is needed, the buffer holds "
                                f"{len(self.buffer) / MS:.0f} ms.", code="input_audio_buffer_commit_empty")
        item_id = self.speech["item_id"] if self.speech else new_id("item")
        audio, self.speech = self.buffer, None
        self.trim_buffer(self.buffer_start + len(self.buffer))
        self.commit(audio, item_id)

    def commit(self, audio: np.ndarray, item_id: str):
        previous = self.items[-1].id if self.items else None
        self.emit("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        self.add_item(Item(id=item_id, role="user", parts=[{"type": "input_audio", "audio": audio}]))

    async def buffer_clear(self, event: dict):
        self.trim_buffer(self.buffer_start + len(self.buffer))
        self.speech = None
        self.emit("input_audio_buffer.cleared")

    # -- conversation items -------------------------------------------------------------------------------------------

    def add_item(self, item: Item, after: Optional[str] = None):
        if len(self.items) >= self.limits.max_items:
            raise RealtimeError(f"The conversation holds its maximum of {self.limits.max_items} items; delete some "
                                "(conversation.item.delete) or start a new session.", code="conversation_full")
        if after is None:
            index = len(self.items)
        else:
            index = 0 if after == "root" else self.index(after, "previous_item_id") + 1
        self.items.insert(index, item)
        previous = self.items[index - 1].id if index > 0 else None
        for name in ("conversation.item.added", "conversation.item.created"):
            self.emit(name, previous_item_id=previous, item=item.to_json(self.dialect))
        if item.status != "in_progress":
            self.emit("conversation.item.done", previous_item_id=previous, item=item.to_json(self.dialect))

    def index(self, item_id, param: str) -> int:
        for i, item in enumerate(self.items):
            if item.id == item_id:
                return i
        raise RealtimeError(f"No conversation item with id {item_id!r}.", param, code="item_not_found")

    async def item_create(self, event: dict):
        after = event.get("previous_item_id")
        if after is not None:
            expect(after, str, "previous_item_id", "an item id")
        item = read_item(event.get("item"), "item", {i.id for i in self.items})
        longest = max((len(p["audio"]) for p in item.parts if p["type"] == "input_audio"), default=0)
        if longest > self.limits.max_buffer_s * SAMPLE_RATE:
            raise RealtimeError(f"Audio items longer than {self.limits.max_buffer_s:g} s are not accepted.",
                                "item.content", code="audio_too_long")
        self.add_item(item, after)

    async def item_delete(self, event: dict):
        index = self.index(event.get("item_id"), "item_id")
        if self.response is not None and self.items[index] is self.response.item:
            raise RealtimeError("The item of the response in progress cannot be deleted; cancel it first.",
                                "item_id", code="item_in_progress")
        item = self.items.pop(index)
        self.emit("conversation.item.deleted", item_id=item.id)

    async def item_retrieve(self, event: dict):
        item = self.items[self.index(event.get("item_id"), "item_id")]
        self.emit("conversation.item.retrieved", item=item.to_json(self.dialect))

    async def item_truncate(self, event: dict):
        """Cut an assistant item's audio at audio_end_ms (what the user heard); its text keeps only the ids that
        arrived with audio before that point, so the next turn's history holds what was actually said."""
        item = self.items[self.index(event.get("item_id"), "item_id")]
        if item.role != "assistant" or item.kind != "audio":
            raise RealtimeError("Only assistant audio items can be truncated.", "item_id", code="invalid_item")
        if event.get("content_index", 0) != 0:
            raise RealtimeError("'content_index' must be 0 (an assistant item has one content part).",
                                "content_index")
        end_ms = expect(event.get("audio_end_ms"), int, "audio_end_ms", "a non-negative integer (milliseconds)")
        if self.response is not None and self.response.item is item:
            self.cancel_response("client_cancelled")
        if not 0 <= end_ms * MS <= item.audio_samples:
            raise RealtimeError(f"'audio_end_ms' ({end_ms}) is beyond the item's audio "
                                f"({item.audio_samples // MS} ms).", "audio_end_ms", code="invalid_value")
        end = end_ms * MS
        kept = [i for i, position in zip(item.text_ids, item.text_positions) if position < end]
        item.text_ids, item.text_positions = kept, item.text_positions[: len(kept)]
        item.text = self.state.detokenizer.decode(kept, skip_special_tokens=True)
        item.audio_samples = end
        self.emit("conversation.item.truncated", item_id=item.id, content_index=0, audio_end_ms=end_ms)

    # -- responses ---------------------------------------------------------------------------------------------------

    async def response_create(self, event: dict):
        if self.response is not None:
            raise RealtimeError(f"Conversation already has an active response in progress: {self.response.id}. "
                                "Wait until it is done (response.done) or cancel it.",
                                code="conversation_already_has_active_response")
        params = event.get("response") or {}
        expect(params, dict, "response", "an object")
        self.start_response(params)

    async def response_cancel(self, event: dict):
        wanted = event.get("response_id")
        if self.response is None or (wanted is not None and wanted != self.response.id):
            raise RealtimeError("Cancellation failed: no active response found.", "response_id",
                                code="response_cancel_not_active")
        self.cancel_response("client_cancelled")

    def start_response(self, params: dict):
        """Validate response.create's parameters, announce the response and run it as a task."""
        config = replace(self.config)
        read_sampling(config, params, "response.")
        if params.get("instructions") is not None:
            config.instructions = expect(params["instructions"], str, "response.instructions", "a string")
        if params.get("output_modalities", params.get("modalities")) is not None:
            config.output_modalities = read_modalities(params.get("output_modalities", params.get("modalities")),
                                                       "response.output_modalities")
        limit = params.get("max_output_tokens", params.get("max_response_output_tokens"))
        if limit is not None:
            config.max_output_tokens = read_max_tokens(limit, "response.max_output_tokens",
                                                       self.state.settings.max_frames)
        conversation = params.get("conversation", "auto")
        if conversation not in ("auto", "none"):
            raise RealtimeError("'response.conversation' must be 'auto' or 'none'.", "response.conversation")
        context = self.items
        if params.get("input") is not None:
            items = expect(params["input"], list, "response.input", "a list of items")
            context = [read_item(item, f"response.input[{i}]", set()) for i, item in enumerate(items)]
        if not any(item.role == "user" and item.conversation_message() for item in context):
            raise RealtimeError("The conversation has no user message to answer.", code="empty_conversation")
        voice = self.voice(config.voice, "session.audio.output.voice") if "audio" in config.output_modalities else None
        settings = self.state.settings
        frames = settings.default_max_frames if config.max_output_tokens == "inf" else config.max_output_tokens
        item = Item(id=new_id("item"), role="assistant", status="in_progress", kind=config.output_modalities[0])
        response = Response(new_id("resp"), item, config.output_modalities, conversation == "auto", frames,
                            IncrementalText(self.state.detokenizer), metadata=params.get("metadata"))
        self.response = response
        self.emit("response.created", response=response.to_json("in_progress", self.dialect, output=False))
        response.task = asyncio.create_task(self.run_response(response, config, list(context), voice))

    async def run_response(self, response: Response, config: SessionConfig, context: List[Item], voice):
        try:
            await self.produce(response, config, context, voice)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug must not leave the session with a response that never ends
            logger.exception("realtime session %s: response %s failed", self.id, response.id)
            if response.job is not None:
                response.job.cancel.set()
            self.finish(response, "failed", {"type": "failed", "error": {"type": "server_error",
                                                                         "message": str(error)}})

    async def produce(self, response: Response, config: SessionConfig, context: List[Item], voice):
        """Announce the assistant item, build and submit the job, and turn its events into server events."""
        item = response.item
        self.emit("response.output_item.added", response_id=response.id, output_index=0,
                  item=item.to_json(self.dialect))
        if response.conversation:
            self.add_item(item)
        self.emit("response.content_part.added", response_id=response.id, item_id=item.id, output_index=0,
                  content_index=0, part=item.part_json(self.dialect))
        try:
            job = await self.build_job(config, context, voice, response.max_frames)
        except APIError as error:
            self.finish(response, "failed", {"type": "failed", "error": {"type": error.type, "code": error.code,
                                                                         "message": error.message}})
            return
        response.job = job
        self.state.engine.submit(job)
        while True:
            event = await job.sink.queue.get()
            if event[0] == "delta":
                self.deliver(response, event[1], event[2])
            elif event[0] == "done":
                response.usage = self.usage(job, event[3], event[2] if job.want_audio else 0)
                status = {"stop": "completed", "length": "incomplete"}.get(event[1], "cancelled")
                details = {"type": "incomplete", "reason": "max_output_tokens"} if status == "incomplete" else None
                self.finish(response, status, details)
                return
            else:
                self.finish(response, "failed", {"type": "failed", "error": {"type": "server_error",
                                                                             "message": event[2]}})
                return

    async def build_job(self, config: SessionConfig, context: List[Item], voice, max_frames: int) -> GenerationJob:
        """The conversation (instructions + items) -> a GenerationJob, on the server's prep thread."""
        messages = [{"role": "system", "content": config.instructions}] if config.instructions else []
        messages += [m for m in (item.conversation_message() for item in context) if m is not None]
        sampling = sampling_params(SimpleNamespace(temperature=config.temperature, top_p=config.top_p,
                                                   top_k=config.top_k), self.state.engine.model.generation_config)
        builder, loop = self.state.builder, asyncio.get_running_loop()
        inputs = await loop.run_in_executor(self.state.prep, builder.thinker_inputs, messages)
        return GenerationJob(kind="chat", thinker_inputs=inputs, sink=EventBridge(loop), voice=voice,
                             max_frames=max_frames, sampling=sampling, seed=config.seed,
                             want_audio="audio" in config.output_modalities)

    def deliver(self, response: Response, text_ids: list, pcm: Optional[np.ndarray]):
        """One engine delta -> transcript and audio deltas; text ids remember where in the audio they arrived."""
        item = response.item
        item.text_ids += list(text_ids)
        item.text_positions += [item.audio_samples] * len(text_ids)
        text = response.text.feed(text_ids)
        where = {"response_id": response.id, "item_id": item.id, "output_index": 0, "content_index": 0}
        if text:
            kind = "response.output_audio_transcript.delta" if item.kind == "audio" else "response.output_text.delta"
            self.emit(kind, delta=text, **where)
        if pcm is not None and len(pcm):
            self.audio_started = True
            item.audio_samples += len(pcm)
            self.emit("response.output_audio.delta", delta=base64.b64encode(pcm16(pcm)).decode(), **where)

    def usage(self, job: Optional[GenerationJob], text_tokens: int, frames: int) -> dict:
        prompt, prompt_audio = self.state.builder.prompt_usage(job) if job is not None else (0, 0)
        return {"total_tokens": prompt + text_tokens + frames, "input_tokens": prompt, "output_tokens":
                text_tokens + frames, "input_token_details": {"text_tokens": prompt - prompt_audio, "audio_tokens":
                prompt_audio, "cached_tokens": 0}, "output_token_details": {"text_tokens": text_tokens,
                                                                            "audio_tokens": frames}}

    def finish(self, response: Response, status: str, details: Optional[dict] = None):
        """The closing events of a response (any outcome), once."""
        if response.done:
            return
        response.done = True
        item = response.item
        tail = response.text.finish()
        where = {"response_id": response.id, "item_id": item.id, "output_index": 0, "content_index": 0}
        if tail:
            self.emit("response.output_audio_transcript.delta" if item.kind == "audio"
                      else "response.output_text.delta", delta=tail, **where)
        item.text = response.text.text
        item.status = "completed" if status == "completed" else "incomplete"
        if item.kind == "audio":
            self.emit("response.output_audio.done", **where)
            self.emit("response.output_audio_transcript.done", transcript=item.text, **where)
        else:
            self.emit("response.output_text.done", text=item.text, **where)
        self.emit("response.content_part.done", part=item.part_json(self.dialect), **where)
        self.emit("response.output_item.done", response_id=response.id, output_index=0,
                  item=item.to_json(self.dialect))
        if response.conversation:
            self.emit("conversation.item.done", item=item.to_json(self.dialect))
        if not response.usage:
            frame = self.state.engine.audio_decoder.frame_samples
            response.usage = self.usage(response.job, len(item.text_ids), item.audio_samples // frame)
        self.emit("response.done", response=response.to_json(status, self.dialect, details))
        if self.response is response:
            self.response = None

    def cancel_response(self, reason: str):
        """Stop the response now: its row leaves the engine after the current frame, nothing more is sent for it,
        and its closing events go out at once (status cancelled, reason turn_detected / client_cancelled)."""
        response = self.response
        if response is None:
            return
        self.abandon_response()
        self.finish(response, "cancelled", {"type": "cancelled", "reason": reason})

    def abandon_response(self):
        response = self.response
        if response is not None:
            if response.job is not None:
                response.job.cancel.set()
            if response.task is not None and response.task is not asyncio.current_task():
                response.task.cancel()


HANDLERS = {
    "session.update": RealtimeSession.session_update,
    "input_audio_buffer.append": RealtimeSession.buffer_append,
    "input_audio_buffer.commit": RealtimeSession.buffer_commit,
    "input_audio_buffer.clear": RealtimeSession.buffer_clear,
    "conversation.item.create": RealtimeSession.item_create,
    "conversation.item.delete": RealtimeSession.item_delete,
    "conversation.item.retrieve": RealtimeSession.item_retrieve,
    "conversation.item.truncate": RealtimeSession.item_truncate,
    "response.create": RealtimeSession.response_create,
    "response.cancel": RealtimeSession.response_cancel,
}
