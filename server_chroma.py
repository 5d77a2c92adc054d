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

Batching (`ChromaEngine`): requests wait in one FIFO queue. The worker admits every waiting request it has room for
as a *cohort*: one batched `ChromaGenerator.stream()` whose rows are the requests (the model gives each row of a
batch what it would give it alone). Requests that arrive while cohorts run form a new cohort at the next chunk
boundary, and the worker advances the active cohorts round-robin one chunk (`chunk_frames`) at a time, so a new
request starts within one chunk instead of waiting for the running batch to end. Rows of one cohort share every
decode step; different cohorts do not (joining a running batch would need the generator to merge per-row state).

Per-row behaviour inside a cohort, so that a request's output never depends on its neighbours:
    * sampling: every row has its own `SamplingParams` and its own `torch.Generator` (`RowSamplingGenerator`), seeded
      with the request's `seed` (or a random one); its draws are exactly those of `model.generate(seed=...)` alone;
    * limits: audio frames, text tokens, text-only answers and cancellation end single rows (`RowLimits`);
    * a client that disconnects sets its row's cancel flag: the row ends after the current frame, and a cohort
      whose rows all ended stops, freeing its slots;
    * audio: the engine decodes the codes with the streaming Mimi decoder, batched (a row's samples may differ
      from its solo run by float rounding, at most 1 LSB of 16-bit PCM) or, with `exact_audio`, row by row
      (bit-identical to the solo run). Codes and text are identical either way.

Security: client strings are never read as paths or URLs unless the operator allows a directory (`--allow-dir`) or
URL fetching (`--allow-url-fetch`); request bodies and audio durations are bounded; `--api-key` (or
OPENCHROMA_API_KEY) requires `Authorization: Bearer <key>` on /v1; every error is OpenAI's JSON error shape.
"""

import argparse
import asyncio
import base64
import binascii
import collections
import copy
import hmac
import io
import json
import logging
import os
import re
import secrets
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Union

import numpy as np
import soundfile as sf
import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generation_chroma import ChromaGenerator, ChromaVoice, SamplingParams, sample_next_token
from .processing_chroma import load_audio


logger = logging.getLogger("openchroma.server")

SAMPLE_RATE = 24000  # Mimi's rate: every audio answer is 24 kHz mono
THINKER_RATE = 16000  # the thinker's audio front end (Whisper features)
# OpenAI's built-in voice names: they resolve to the server's default voice unless a voice with that id exists
OPENAI_VOICE_NAMES = frozenset(
    "alloy ash ballad coral echo fable nova onyx sage shimmer verse marin cedar".split()
)
VOICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BASE64_PATTERN = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
# Prompt for /v1/audio/speech: the thinker reads the request, then the forced text is fed as its answer
SPEECH_PROMPT = "Read the following text aloud, exactly as written:\n{text}"


@dataclass
class ServerSettings:
    """What the operator decides; everything a request may ask for is bounded here."""

    model_name: str = "chroma-4b"  # the id /v1/models lists and requests name
    model_aliases: tuple = ()  # other accepted `model` values (e.g. the hub id)
    api_key: Optional[str] = None
    voices_dir: Optional[Path] = None  # None: voices live in memory only
    default_voice: Optional[str] = None  # voice id used when a request names none (or an OpenAI built-in name)
    allow_dirs: tuple = ()  # directories whose files `prompt_audio` may name
    allow_url_fetch: bool = False
    url_fetch_timeout_s: float = 15.0
    max_body_bytes: int = 32 * 1024 * 1024
    max_audio_seconds: float = 60.0  # per clip (user audio and reference voices)
    max_input_chars: int = 4096  # /v1/audio/speech input
    default_max_frames: int = 1000  # audio frames per answer when the request sets none (80 ms each)
    max_frames: int = 2000  # upper bound a request may ask for
    max_text_tokens: int = 1024  # upper bound on max_completion_tokens / max_tokens
    audio_ttl_s: int = 3600  # how long an answer's audio id can be referenced in a later turn


# ----------------------------------------------------------------------------------------------------------------------
# Errors (OpenAI's shape: {"error": {"message", "type", "param", "code"}})
# ----------------------------------------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message, type="invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.type, error.param, error.code), status_code=error.status)


def bad_request(message, param=None, code=None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------------------------------------------------
# Request schemas
# ----------------------------------------------------------------------------------------------------------------------


class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str


Voice = Union[str, VoiceRef]


class AudioOutputParams(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    voice: Optional[Voice] = None
    format: Literal["wav", "mp3", "flac", "opus", "aac", "pcm16"] = "wav"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class AudioIdRef(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[Dict[str, Any]], None] = None
    audio: Optional[AudioIdRef] = None  # a previous answer's audio, by id (assistant turns)
    name: Optional[str] = None


class SamplingFields(BaseModel):
    """Sampling controls shared by chat and speech. temperature 0 is greedy; omitted fields take the model's
    generation config. They apply to the audio codes; the thinker's text is greedy, as published."""

    model_config = ConfigDict(extra="ignore", strict=True)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)  # extension
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    max_audio_frames: Optional[int] = Field(None, ge=1)  # extension: 80 ms frames of audio
    # Chroma-SGLang / vllm-omni style per-request reference voice (base64 or data URI)
    prompt_audio: Optional[str] = None
    prompt_text: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    model: Optional[str] = None
    messages: List[ChatMessage] = Field(min_length=1)
    modalities: Optional[List[Literal["text", "audio"]]] = None
    audio: Optional[AudioOutputParams] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    n: Optional[int] = Field(None, ge=1, le=1)
    return_audio: Optional[bool] = None  # Chroma-SGLang
    tools: Optional[List[Any]] = None


class SpeechRequest(SamplingFields):
    model: Optional[str] = None
    input: str
    voice: Optional[Voice] = None
    instructions: Optional[str] = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: Optional[float] = Field(None, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    ref_audio: Optional[str] = None  # vllm-omni names for prompt_audio / prompt_text
    ref_text: Optional[str] = None


# ----------------------------------------------------------------------------------------------------------------------
# Audio out
# ----------------------------------------------------------------------------------------------------------------------

# response format -> (soundfile format, subtype, media type); None = raw 16-bit little-endian PCM
AUDIO_FORMATS = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
    "pcm": (None, None, "audio/pcm"),
    "pcm16": (None, None, "audio/pcm"),
}


def check_audio_format(name: str, param: str) -> None:
    spec = AUDIO_FORMATS.get(name)
    if spec is None or (spec[0] is not None and spec[0] not in sf.available_formats()):
        supported = [f for f, s in AUDIO_FORMATS.items() if s[0] is None or s[0] in sf.available_formats()]
        raise bad_request(f"Audio format {name!r} is not supported by this server; use one of {supported}.",
                          param=param, code="unsupported_format")


def to_int16(samples: np.ndarray) -> np.ndarray:
    """float waveform -> int16 samples (clipped to [-1, 1]); every output format is quantized this one way."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")


def pcm16(samples: np.ndarray) -> bytes:
    """float waveform -> raw 16-bit little-endian PCM."""
    return to_int16(samples).tobytes()


def encode_audio(samples: np.ndarray, name: str) -> bytes:
    """24 kHz float waveform -> a complete file (or raw PCM) in format `name`."""
    container, subtype, _ = AUDIO_FORMATS[name]
    if container is None:
        return pcm16(samples)
    buffer = io.BytesIO()
    sf.write(buffer, to_int16(samples), SAMPLE_RATE, format=container, subtype=subtype)
    return buffer.getvalue()


def streaming_wav_header() -> bytes:
    """A 16-bit mono 24 kHz WAV header with unknown length (0xFFFFFFFF sizes), for chunked bodies."""
    byte_rate = SAMPLE_RATE * 2
    return (b"RIFF" + (0xFFFFFFFF).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
            + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + SAMPLE_RATE.to_bytes(4, "little")
            + byte_rate.to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
            + b"data" + (0xFFFFFFFF).to_bytes(4, "little"))


# ----------------------------------------------------------------------------------------------------------------------
# Voices: encoded once, kept in memory, persisted as <id>.safetensors + <id>.json
# ----------------------------------------------------------------------------------------------------------------------


class VoiceStore:
    """Registered voices by id. Ids are generated by the server (or chosen by the operator) and checked against
    VOICE_ID_PATTERN, so a file name is never built from unchecked client text."""

    def __init__(self, folder: Optional[Path] = None):
        self.folder = Path(folder) if folder is not None else None
        self._voices: Dict[str, ChromaVoice] = {}
        self._info: Dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._load_folder()

    def _load_folder(self):
        for meta_path in sorted(self.folder.glob("*.json")):
            voice_id = meta_path.stem
            weights = meta_path.with_suffix(".safetensors")
            try:
                info = json.loads(meta_path.read_text())
                if not VOICE_ID_PATTERN.match(voice_id) or info.get("id") != voice_id:
                    raise ValueError("id does not match the file name")
                self._voices[voice_id] = ChromaVoice.load(weights)
                self._info[voice_id] = info
            except Exception as error:  # one broken file must not stop the server
                logger.warning("skipping voice %s: %s", meta_path, error)
        logger.info("loaded %d voice(s) from %s", len(self._voices), self.folder)

    def add(self, voice: ChromaVoice, info: dict) -> dict:
        voice_id = info["id"]
        if not VOICE_ID_PATTERN.match(voice_id):
            raise ValueError(f"invalid voice id {voice_id!r}")
        if self.folder is not None:
            voice.save(self.folder / f"{voice_id}.safetensors")
            (self.folder / f"{voice_id}.json").write_text(json.dumps(info, indent=2))
        with self._lock:
            self._voices[voice_id] = voice
            self._info[voice_id] = info
        return info

    def get(self, voice_id: str) -> Optional[ChromaVoice]:
        with self._lock:
            return self._voices.get(voice_id)

    def info(self, voice_id: str) -> Optional[dict]:
        with self._lock:
            return self._info.get(voice_id)

    def list(self) -> List[dict]:
        with self._lock:
            return [self._info[v] for v in sorted(self._info, key=lambda v: self._info[v]["created_at"])]

    def delete(self, voice_id: str) -> bool:
        with self._lock:
            if self._voices.pop(voice_id, None) is None:
                return False
            self._info.pop(voice_id, None)
        if self.folder is not None:
            for suffix in (".safetensors", ".json"):
                (self.folder / f"{voice_id}{suffix}").unlink(missing_ok=True)
        return True


# ----------------------------------------------------------------------------------------------------------------------
# The engine: one worker thread owns the model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationJob:
    """One request for the worker: a conversation's thinker inputs [1, S], a voice and limits.

    `sink` receives ("delta", text_ids, pcm float32 [n] or None) events, then ("done", finish_reason, frames,
    text_tokens) or ("error", http_status, message); it is called from the worker thread.
    """

    kind: Literal["chat", "speech"]
    thinker_inputs: Dict[str, torch.Tensor]
    sink: Callable[[tuple], None]
    voice: Optional[ChromaVoice] = None
    reference: Optional[tuple] = None  # (24 kHz waveform [T], transcript ids [P]) encoded on admission
    forced_text_ids: Optional[torch.Tensor] = None  # [N] speech: the text to speak
    max_frames: int = 1000
    max_text_tokens: Optional[int] = None
    sampling: SamplingParams = SamplingParams()
    seed: Optional[int] = None
    want_audio: bool = True
    cancel: threading.Event = field(default_factory=threading.Event)


class RowSamplingGenerator(ChromaGenerator):
    """A `ChromaGenerator` whose rows sample independently: row b draws with its own params and torch.Generator.

    One shared generator would make a row's draws depend on its neighbours (a [B, V] draw consumes the stream for
    every row). Here a sampled row runs `sample_next_token` on its own logits [1, V] with its own generator, which
    is exactly what `model.generate(seed=...)` does for that request alone; greedy rows take the argmax together.
    """

    def __init__(self, model, row_sampling: List[SamplingParams], row_generators: List[Optional[torch.Generator]]):
        super().__init__(model)
        self.sampled_rows = [(b, p, g) for b, (p, g) in enumerate(zip(row_sampling, row_generators)) if p.do_sample]

    def choose_code(self, logits, params):
        logits = logits[..., : self.config.codebook_size]  # never a special value: Mimi decodes every frame
        codes = logits.argmax(dim=-1)
        for b, row_params, generator in self.sampled_rows:
            codes[b] = sample_next_token(logits[b:b + 1], row_params, generator)[0]
        return codes


class RowLimits:
    """Stopping criterion ending single rows: frame limit, cancellation, text-only answers whose text is complete.
    It also applies per-row text limits (what `max_text_tokens` does for a whole batch), at the same point of the
    loop, so every row stops talking exactly where it would alone. Device tensors only: no host sync."""

    def __init__(self, jobs: List[GenerationJob], device):
        self.jobs = jobs
        self.max_frames = torch.tensor([j.max_frames for j in jobs], device=device)
        big = torch.iinfo(torch.long).max
        self.max_text = torch.tensor([j.max_text_tokens or big for j in jobs], device=device)
        self.text_only = torch.tensor([not j.want_audio for j in jobs], device=device)

    def __call__(self, state):
        state.thinker_alive = state.thinker_alive & (state.text_count < self.max_text)
        stop = (len(state.frames) >= self.max_frames) | (self.text_only & ~state.thinker_alive)
        if any(job.cancel.is_set() for job in self.jobs):
            stop = stop | torch.tensor([job.cancel.is_set() for job in self.jobs], device=stop.device)
        return stop


@dataclass
class Cohort:
    """Requests admitted together: one batched stream, advanced one chunk at a time."""

    jobs: List[GenerationJob]
    chunks: Any  # the ChromaGenerator.stream iterator (codes and text; audio is decoded by the engine)
    codec_states: list  # one MimiStreamState for the whole batch, or one per row (exact_audio)
    # per row: the answer is complete; text ids and audio frames sent so far; the last text id
    ended: List[bool] = field(init=False)
    text_counts: List[int] = field(init=False)
    frame_counts: List[int] = field(init=False)
    last_text: List[Optional[int]] = field(init=False)

    def __post_init__(self):
        n = len(self.jobs)
        self.ended, self.text_counts, self.frame_counts, self.last_text = [False] * n, [0] * n, [0] * n, [None] * n


class ChromaEngine:
    """Owns the model on one worker thread; see the module docstring for the scheduling.

    max_batch_size: rows per cohort; max_active_rows: rows across all running cohorts (the rest wait, FIFO);
    batch_window_s: when idle, how long the first request waits for others to share its cohort;
    chunk_frames: frames per chunk (the granularity of streaming and of round-robin between cohorts);
    exact_audio: decode every row's audio on its own (a batch-of-one Mimi call per row and chunk), so a request's
        audio is bit-identical alone or under load. Batched decoding (the default) is faster; its rows differ from
        solo decoding by float re-association (|error| ~1e-6, at most 1 LSB of 16-bit PCM). The codes and text
        are identical either way.
    """

    def __init__(self, model, processor, max_batch_size: int = 16, max_active_rows: int = 64,
                 batch_window_s: float = 0.01, chunk_frames=(2,), exact_audio: bool = False):
        self.model = model
        self.processor = processor
        self.audio_decoder = model.streaming_audio_decoder()
        self.exact_audio = exact_audio
        self.device = model.backbone.codebook0_head.weight.device
        self.max_batch_size = max_batch_size
        self.max_active_rows = max_active_rows
        self.batch_window_s = batch_window_s
        self.chunk_frames = tuple(chunk_frames)
        self.metrics = collections.Counter()
        self._pending = collections.deque()  # GenerationJob | (callable, Future), FIFO
        self._cohorts = []  # running Cohorts, advanced in turn
        self._turn = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = None

    # -- public (any thread) ---------------------------------------------------------------------------------------

    def start(self):
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="chroma-worker", daemon=True)
            self._thread.start()

    def stop(self):
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: GenerationJob):
        with self._wake:
            if self._stopping:
                raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
            self._pending.append(job)
            self.metrics["requests_total"] += 1
            self._wake.notify_all()

    def call(self, fn: Callable) -> Future:
        """Run fn(model) on the worker thread between decode steps (e.g. encoding a voice)."""
        future = Future()
        with self._wake:
            self._pending.append((fn, future))
            self._wake.notify_all()
        return future

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        with self._wake:
            queued = sum(isinstance(p, GenerationJob) for p in self._pending)
            active = sum(len(c.jobs) - sum(c.ended) for c in self._cohorts)
            return {"queued": queued, "active_rows": active, "cohorts": len(self._cohorts),
                    "worker_alive": self.alive, **self.metrics}

    # -- worker thread -----------------------------------------------------------------------------------------------

    def _run(self):
        logger.info("worker started (max batch %d, %d active rows)", self.max_batch_size, self.max_active_rows)
        while True:
            with self._wake:
                while not self._pending and not self._cohorts and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
                if not self._cohorts and self._pending and self.batch_window_s > 0:
                    self._wait_for_company()
                admitted = self._take_admissible()
            for item in admitted:
                if isinstance(item, tuple):
                    self._run_call(*item)
            jobs = [item for item in admitted if isinstance(item, GenerationJob)]
            for kind in ("chat", "speech"):  # a batch is all free-talking or all forced-text (speech) rows
                group = [job for job in jobs if job.kind == kind]
                for start in range(0, len(group), self.max_batch_size):
                    rows = group[start:start + self.max_batch_size]
                    try:
                        self._start_cohort(rows)
                    except Exception as error:
                        self._fail(rows, error)
            if self._cohorts:  # round-robin: one chunk of the next cohort
                self._turn %= len(self._cohorts)
                cohort = self._cohorts[self._turn]
                try:
                    keep = self._advance(cohort)
                except Exception as error:
                    self._fail([job for job, ended in zip(cohort.jobs, cohort.ended) if not ended], error)
                    keep = False
                if keep:
                    self._turn += 1
                else:
                    with self._wake:
                        self._cohorts.remove(cohort)
        self._shutdown()

    def _fail(self, jobs, error):
        """An unexpected failure: the requests involved get a 500, the worker carries on."""
        logger.error("generation failed for %d request(s)", len(jobs), exc_info=error)
        for job in jobs:
            job.sink(("error", 500, f"Generation failed: {error}"))
        self.metrics["errors_total"] += len(jobs)

    def _wait_for_company(self):
        """Idle worker, first request in: wait up to batch_window_s for others (lock held by caller)."""
        deadline = time.monotonic() + self.batch_window_s
        while not self._stopping and len(self._pending) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.wait(remaining)

    def _take_admissible(self):
        """Pop pending items in FIFO order while rows are free (lock held by caller). A job that does not fit stops
        admission, so later requests never overtake it."""
        active = sum(len(c.jobs) - sum(c.ended) for c in self._cohorts)
        admitted = []
        while self._pending:
            item = self._pending[0]
            if isinstance(item, GenerationJob):
                if active >= self.max_active_rows:
                    break
                active += 1
            admitted.append(self._pending.popleft())
        return admitted

    def _run_call(self, fn, future):
        if not future.set_running_or_notify_cancel():
            return
        try:
            with torch.no_grad():
                future.set_result(fn(self.model))
        except BaseException as error:  # handed to the waiting request
            future.set_exception(error)

    def _start_cohort(self, jobs: List[GenerationJob]):
        ready = []
        for job in jobs:
            if job.cancel.is_set():  # the client left while queued
                self.metrics["cancelled_total"] += 1
                continue
            if job.voice is None and job.reference is not None:
                try:
                    job.voice = self.model.encode_voice(*job.reference)
                except Exception as error:
                    job.sink(("error", 400, f"Could not encode the reference voice: {error}"))
                    self.metrics["errors_total"] += 1
                    continue
            if job.voice is None:  # a text-only answer: the thinker's text never depends on the voice
                job.voice = silent_voice(self.model)
            ready.append(job)
        if not ready:
            return
        chunks = self._stream(ready)
        wants_audio = [job.want_audio for job in ready]
        if self.exact_audio:
            states = [self.audio_decoder.init_state(1) if want else None for want in wants_audio]
        else:
            states = [self.audio_decoder.init_state(len(ready))] if any(wants_audio) else []
        with self._wake:
            self._cohorts.append(Cohort(ready, chunks, states))
        self.metrics["batches_total"] += 1
        logger.debug("started a %s batch of %d", ready[0].kind, len(ready))

    def _stream(self, jobs: List[GenerationJob]):
        inputs = collate_thinker_inputs([job.thinker_inputs for job in jobs], self.processor.tokenizer.pad_token_id)
        forced = [job.forced_text_ids for job in jobs] if jobs[0].kind == "speech" else None
        inputs = self.model.prepare_generation_inputs(
            input_ids=None, attention_mask=None, input_values=None, input_values_cutoffs=None,
            voice=[job.voice for job in jobs], forced_text_ids=forced, **inputs,
        )
        generators = []
        for job in jobs:
            seed = job.seed if job.seed is not None else secrets.randbits(63)
            generators.append(torch.Generator(device=self.device).manual_seed(seed) if job.sampling.do_sample else None)
        runner = RowSamplingGenerator(self.model, [job.sampling for job in jobs], generators)
        return runner.stream(
            inputs, max(job.max_frames for job in jobs), chunk_frames=self.chunk_frames,
            decode_audio=False, stopping_criteria=[RowLimits(jobs, self.device)],
            reuse_voice_kv=True,
        )

    def _advance(self, cohort: Cohort) -> bool:
        """Run the cohort to its next chunk and hand every row its part. -> False when the cohort is over."""
        try:
            with torch.no_grad():
                chunk = next(cohort.chunks)
        except StopIteration:
            self._end_rows(cohort, range(len(cohort.jobs)))
            return False
        pcm = self._decode(cohort, chunk)
        valid_counts = chunk.audio_valid.sum(-1).tolist()
        finished = chunk.finished.tolist()
        samples_per_frame = self.audio_decoder.frame_samples
        for b, job in enumerate(cohort.jobs):
            if cohort.ended[b]:
                continue
            text_ids = chunk.text_ids[b].tolist()
            cohort.text_counts[b] += len(text_ids)
            if text_ids:
                cohort.last_text[b] = text_ids[-1]
            valid = int(valid_counts[b])
            cohort.frame_counts[b] += valid
            self.metrics["frames_total"] += valid
            audio = pcm[b][: valid * samples_per_frame] if pcm[b] is not None else None
            if text_ids or (audio is not None and len(audio)):
                job.sink(("delta", text_ids, audio))
            if finished[b] or job.cancel.is_set():
                self._end_rows(cohort, [b])
        return not all(cohort.ended)

    def _decode(self, cohort: Cohort, chunk) -> list:
        """The chunk's codes -> per row a float32 waveform [n * frame_samples] (None for rows without audio).
        Rows past their end decode zeros, which keeps a batched decoder state aligned; their audio is dropped."""
        codes = chunk.audio_codes.transpose(1, 2)  # [B, K, n]
        rows = [None] * len(cohort.jobs)
        if not cohort.codec_states:
            return rows
        if not self.exact_audio:
            pcm = self.audio_decoder.decode_chunk(codes, cohort.codec_states[0]).float().cpu().numpy()
            return [pcm[b] if job.want_audio else None for b, job in enumerate(cohort.jobs)]
        for b, state in enumerate(cohort.codec_states):
            if state is not None and not cohort.ended[b]:
                rows[b] = self.audio_decoder.decode_chunk(codes[b:b + 1], state)[0].float().cpu().numpy()
        return rows

    def _end_rows(self, cohort: Cohort, rows):
        im_end = self.model.config.im_end_token_id
        for b in rows:
            if cohort.ended[b]:
                continue
            cohort.ended[b] = True
            job = cohort.jobs[b]
            if job.cancel.is_set():
                reason = "cancelled"
                self.metrics["cancelled_total"] += 1
            elif cohort.frame_counts[b] >= job.max_frames:
                reason = "length"
            elif not job.want_audio and cohort.last_text[b] != im_end:
                reason = "length"  # the text limit ended a text-only answer
            else:
                reason = "stop"
            self.metrics["completed_total"] += reason != "cancelled"
            job.sink(("done", reason, cohort.frame_counts[b], cohort.text_counts[b]))

    def _shutdown(self):
        for cohort in self._cohorts:
            for b, job in enumerate(cohort.jobs):
                if not cohort.ended[b]:
                    job.sink(("error", 503, "The server is shutting down."))
        self._cohorts.clear()
        while self._pending:
            item = self._pending.popleft()
            if isinstance(item, tuple):
                item[1].cancel()
            else:
                item.sink(("error", 503, "The server is shutting down."))
        logger.info("worker stopped")


def silent_voice(model) -> ChromaVoice:
    """A one-frame empty voice for text-only answers: the thinker's text never depends on the voice."""
    codes = torch.zeros(1, model.config.audio_num_codebooks, dtype=torch.long)
    return ChromaVoice(text_ids=torch.zeros(0, dtype=torch.long), codes=codes)


def collate_thinker_inputs(rows: List[Dict[str, torch.Tensor]], pad_id: int) -> Dict[str, Optional[torch.Tensor]]:
    """Per-request processor outputs (batch 1) -> one batch, padded as the processor pads a batch: prompt ids on the
    left, mel features on the right (padding is masked, so every row reads exactly its own inputs)."""
    length = max(r["thinker_input_ids"].shape[1] for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        n = r["thinker_input_ids"].shape[1]
        ids[b, length - n:] = r["thinker_input_ids"][0]
        mask[b, length - n:] = r["thinker_attention_mask"][0]
    clips = [(r["thinker_input_features"], r["thinker_feature_attention_mask"])
             for r in rows if r.get("thinker_input_features") is not None]
    features = feature_mask = None
    if clips:
        frames = max(f.shape[-1] for f, _ in clips)
        features = torch.cat([torch.nn.functional.pad(f, (0, frames - f.shape[-1])) for f, _ in clips])
        feature_mask = torch.cat([torch.nn.functional.pad(m, (0, frames - m.shape[-1])) for _, m in clips])
    return {"thinker_input_ids": ids, "thinker_attention_mask": mask,
            "thinker_input_features": features, "thinker_feature_attention_mask": feature_mask}


# ----------------------------------------------------------------------------------------------------------------------
# Requests -> jobs (runs on the "chroma-prep" thread; raises APIError for anything the client got wrong)
# ----------------------------------------------------------------------------------------------------------------------


class RequestBuilder:
    """Reads a validated request into a `GenerationJob`: decodes audio under the server's rules, builds the
    conversation and runs the processor. Strings from clients are decoded as base64 / data URIs; they are read as
    files or fetched as URLs only where the operator allowed it."""

    def __init__(self, processor, settings: ServerSettings, answers: "AnswerMemory"):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.settings = settings
        self.answers = answers
        self.audio_token_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")

    # -- audio sources -------------------------------------------------------------------------------------------

    def audio_bytes(self, text: str, param: str, base64_only: bool = False) -> bytes:
        """A client string -> encoded audio bytes: base64 or a data URI; an http(s) URL or a file in an allowed
        directory only when the operator enabled them."""
        if not isinstance(text, str) or not text.strip():
            raise bad_request(f"'{param}' must be a non-empty string of base64 audio.", param)
        text = text.strip()
        if text.startswith("data:"):
            header, comma, payload = text.partition(",")
            if not comma or not header.endswith(";base64"):
                raise bad_request(f"'{param}': only base64 data URIs are accepted (data:audio/wav;base64,...).", param)
            return decode_base64(payload, param)
        scheme = urllib.parse.urlparse(text).scheme.lower()
        if not base64_only and scheme in ("http", "https"):
            if not self.settings.allow_url_fetch:
                raise bad_request(f"'{param}': fetching audio from URLs is disabled on this server; send base64 audio.",
                                  param, code="url_fetch_disabled")
            return self.fetch_url(text, param)
        compact = re.sub(r"\s+", "", text)
        looks_base64 = len(compact) >= 64 and len(compact) % 4 == 0 and BASE64_PATTERN.match(compact)
        if looks_base64 or base64_only:
            return decode_base64(compact, param)
        if self.settings.allow_dirs:
            return self.read_allowed_file(text, param)
        raise bad_request(
            f"'{param}' is neither base64 audio nor a data URI (file paths and URLs are not accepted unless the "
            "operator enables --allow-dir / --allow-url-fetch).", param, code="invalid_audio_source")

    def read_allowed_file(self, text: str, param: str) -> bytes:
        name = urllib.parse.unquote(urllib.parse.urlparse(text).path) if text.startswith("file:") else text
        for folder in self.settings.allow_dirs:
            root = os.path.realpath(folder)
            path = os.path.realpath(os.path.join(root, os.path.expanduser(name)))
            if os.path.commonpath([root, path]) == root and os.path.isfile(path):
                if os.path.getsize(path) > self.settings.max_body_bytes:
                    raise APIError(413, f"'{param}': the file is larger than the server's limit.", param)
                with open(path, "rb") as file:
                    return file.read()
        raise bad_request(f"'{param}': no such file inside the allowed directories.", param, code="file_not_allowed")

    def fetch_url(self, url: str, param: str) -> bytes:
        limit = self.settings.max_body_bytes
        try:
            with urllib.request.urlopen(url, timeout=self.settings.url_fetch_timeout_s) as response:
                data = response.read(limit + 1)
        except OSError as error:
            raise bad_request(f"'{param}': could not fetch {url!r}: {error}", param, code="url_fetch_failed") from None
        if len(data) > limit:
            raise APIError(413, f"'{param}': the audio at {url!r} is larger than the server's limit.", param)
        return data

    def waveform(self, data: bytes, rate: int, param: str, format_hint: Optional[str] = None) -> np.ndarray:
        """Encoded audio (or raw 24 kHz pcm16 when format_hint says so) -> mono float32 at `rate`, length-checked."""
        limit = self.settings.max_audio_seconds
        too_long = f"'{param}': audio longer than {limit:g} s is not accepted."
        try:
            if format_hint in ("pcm16", "pcm"):
                samples = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
                if len(samples) > limit * SAMPLE_RATE:
                    raise bad_request(too_long, param, code="audio_too_long")
                return load_audio((samples, SAMPLE_RATE), rate)
            try:  # cheap header check before decoding everything
                if sf.info(io.BytesIO(data)).duration > limit:
                    raise bad_request(too_long, param, code="audio_too_long")
            except (RuntimeError, sf.LibsndfileError, TypeError):
                pass  # not a format soundfile reads from a header: decode and check below
            waveform = load_audio(data, rate)
        except APIError:
            raise
        except Exception as error:
            raise bad_request(f"'{param}' is not audio the server can decode: {error}", param,
                              code="invalid_audio") from None
        if len(waveform) > limit * rate:
            raise bad_request(too_long, param, code="audio_too_long")
        return waveform

    def reference(self, audio: Optional[str], text: Optional[str], audio_param: str, text_param: str):
        """Per-request reference voice -> (24 kHz waveform tensor [T], transcript ids [P]) or None."""
        if audio is None and text is None:
            return None
        if audio is None or text is None or not str(text).strip():
            raise bad_request(f"Give both '{audio_param}' (the reference recording) and '{text_param}' (its exact "
                              "transcript), or neither.", audio_param if audio is None else text_param)
        wave = self.waveform(self.audio_bytes(audio, audio_param), SAMPLE_RATE, audio_param)
        ids = self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        return torch.from_numpy(wave), torch.tensor(ids, dtype=torch.long)

    # -- conversations -----------------------------------------------------------------------------------------

    def conversation(self, messages: List[ChatMessage]) -> list:
        conversation = []
        for i, message in enumerate(messages):
            role = "system" if message.role == "developer" else message.role
            param = f"messages[{i}]"
            if role == "assistant":
                conversation.append({"role": role, "content": self.assistant_text(message, param)})
            elif message.content is None:
                raise bad_request(f"'{param}.content' is required for {message.role} messages.", f"{param}.content")
            elif isinstance(message.content, str):
                conversation.append({"role": role, "content": message.content})
            else:
                items = [self.content_item(item, f"{param}.content[{j}]", role) for j, item in
                         enumerate(message.content)]
                conversation.append({"role": role, "content": items})
        return conversation

    def assistant_text(self, message: ChatMessage, param: str) -> str:
        """A previous answer: its text content, or the transcript of its audio id."""
        if isinstance(message.content, str):
            return message.content
        if isinstance(message.content, list):
            parts = [self.content_item(item, f"{param}.content[{j}]", "assistant") for j, item in
                     enumerate(message.content)]
            return "".join(part["text"] for part in parts)
        if message.audio is not None:
            transcript = self.answers.transcript(message.audio.id)
            if transcript is None:
                raise bad_request(f"'{param}.audio.id': unknown or expired audio id {message.audio.id!r}.",
                                  f"{param}.audio.id", code="audio_not_found")
            return transcript
        raise bad_request(f"'{param}' needs 'content' or 'audio': {{'id': ...}}.", param)

    def content_item(self, item: dict, param: str, role: str) -> dict:
        kind = item.get("type")
        if kind in ("text", "input_text"):
            if not isinstance(item.get("text"), str):
                raise bad_request(f"'{param}.text' must be a string.", f"{param}.text")
            return {"type": "text", "text": item["text"]}
        if kind in ("input_audio", "audio_url") and role != "user":
            raise bad_request(f"'{param}': audio is only accepted in user messages.", param)
        if kind == "input_audio":
            payload = item.get("input_audio")
            if not isinstance(payload, dict) or not isinstance(payload.get("data"), str):
                raise bad_request(f"'{param}.input_audio' must be {{'data': <base64>, 'format': 'wav'|'mp3'}}.",
                                  f"{param}.input_audio")
            data = self.audio_bytes(payload["data"], f"{param}.input_audio.data", base64_only=True)
            wave = self.waveform(data, THINKER_RATE, f"{param}.input_audio.data", payload.get("format"))
            return {"type": "audio", "audio": (wave, THINKER_RATE)}
        if kind == "audio_url":
            url = (item.get("audio_url") or {}).get("url") if isinstance(item.get("audio_url"), dict) else None
            if not isinstance(url, str):
                raise bad_request(f"'{param}.audio_url' must be {{'url': <data URI>}}.", f"{param}.audio_url")
            wave = self.waveform(self.audio_bytes(url, f"{param}.audio_url.url"), THINKER_RATE,
                                 f"{param}.audio_url.url")
            return {"type": "audio", "audio": (wave, THINKER_RATE)}
        raise bad_request(f"'{param}': unsupported content type {kind!r} (use 'text' or 'input_audio').",
                          f"{param}.type", code="unsupported_content")

    def thinker_inputs(self, conversation) -> Dict[str, torch.Tensor]:
        try:
            inputs = self.processor(conversation)
        except ValueError as error:
            raise bad_request(f"Invalid conversation: {error}", "messages") from None
        return {k: v for k, v in inputs.items() if k.startswith("thinker_")}

    # -- jobs ------------------------------------------------------------------------------------------------------

    def limits(self, body, max_text_tokens=None, want_audio=True):
        """-> (audio frames, text tokens) the request may use. A text-only answer ends with its text, so its only
        frame bound is the server's (the loop still runs one frame per half text token)."""
        frames = body.max_audio_frames or (self.settings.default_max_frames if want_audio else self.settings.max_frames)
        if frames > self.settings.max_frames:
            raise bad_request(f"'max_audio_frames' must be at most {self.settings.max_frames}.", "max_audio_frames")
        if max_text_tokens is not None and max_text_tokens > self.settings.max_text_tokens:
            raise bad_request(f"'max_completion_tokens' must be at most {self.settings.max_text_tokens}.",
                              "max_completion_tokens")
        return frames, max_text_tokens

    def chat_job(self, body: ChatCompletionRequest, voice, want_audio: bool, sink, generation_config) -> GenerationJob:
        frames, text_limit = self.limits(body, body.max_completion_tokens or body.max_tokens, want_audio)
        reference = self.reference(body.prompt_audio, body.prompt_text, "prompt_audio", "prompt_text")
        inputs = self.thinker_inputs(self.conversation(body.messages))
        return GenerationJob(
            kind="chat", thinker_inputs=inputs, sink=sink, voice=None if reference else voice, reference=reference,
            max_frames=frames, max_text_tokens=text_limit, sampling=sampling_params(body, generation_config),
            seed=body.seed, want_audio=want_audio,
        )

    def speech_job(self, body: SpeechRequest, voice, sink, generation_config) -> GenerationJob:
        text = body.input.strip()
        if not text:
            raise bad_request("'input' is empty: give the text to speak.", "input", code="empty_input")
        if len(text) > self.settings.max_input_chars:
            raise bad_request(f"'input' is longer than {self.settings.max_input_chars} characters.", "input")
        frames, _ = self.limits(body)
        audio, transcript = body.prompt_audio or body.ref_audio, body.prompt_text or body.ref_text
        reference = self.reference(audio, transcript, "prompt_audio", "prompt_text")
        conversation = [{"role": "user", "content": SPEECH_PROMPT.format(text=text)}]
        if body.instructions:
            conversation.insert(0, {"role": "system", "content": body.instructions})
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return GenerationJob(
            kind="speech", thinker_inputs=self.thinker_inputs(conversation), sink=sink,
            voice=None if reference else voice, reference=reference, forced_text_ids=torch.tensor(ids),
            max_frames=frames, sampling=sampling_params(body, generation_config), seed=body.seed,
        )

    def prompt_usage(self, job: GenerationJob) -> tuple:
        """-> (prompt tokens, audio tokens among them)."""
        ids = job.thinker_inputs["thinker_input_ids"][job.thinker_inputs["thinker_attention_mask"].bool()]
        return int(ids.numel()), int((ids == self.audio_token_id).sum())


def decode_base64(payload: str, param: str) -> bytes:
    payload = re.sub(r"\s+", "", payload)
    try:
        if "-" in payload or "_" in payload:
            data = base64.urlsafe_b64decode(payload)
        else:
            data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"'{param}' is not valid base64.", param, code="invalid_base64") from None
    if not data:
        raise bad_request(f"'{param}' holds no audio.", param, code="invalid_audio")
    return data


def sampling_params(body: SamplingFields, generation_config) -> SamplingParams:
    """temperature 0 -> greedy; a positive temperature samples; unset fields come from the model's config."""

    def default(name, fallback):
        value = getattr(generation_config, name, None) if generation_config is not None else None
        return fallback if value is None else value

    if body.temperature == 0:
        return SamplingParams()
    do_sample = True if body.temperature is not None else bool(default("do_sample", False))
    return SamplingParams(
        do_sample=do_sample,
        temperature=float(body.temperature if body.temperature is not None else default("temperature", 1.0)),
        top_k=int(body.top_k if body.top_k is not None else default("top_k", 50)),
        top_p=float(body.top_p if body.top_p is not None else default("top_p", 1.0)),
    )


class AnswerMemory:
    """Transcripts of recent answers by audio id, so a later turn can reference {"audio": {"id": ...}}."""

    def __init__(self, ttl_s: int, capacity: int = 10000):
        self.ttl_s, self.capacity = ttl_s, capacity
        self._items = collections.OrderedDict()
        self._lock = threading.Lock()

    def new_id(self) -> tuple:
        """-> (audio id, expires_at unix seconds) for an answer being produced."""
        return f"audio_{secrets.token_hex(12)}", int(time.time()) + self.ttl_s

    def put(self, audio_id: str, expires_at: int, transcript: str):
        with self._lock:
            self._items[audio_id] = (transcript, expires_at)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def transcript(self, audio_id: str) -> Optional[str]:
        with self._lock:
            item = self._items.get(audio_id)
        return item[0] if item is not None and item[1] > time.time() else None


class IncrementalText:
    """Token ids arriving a few at a time -> text deltas (holds back a split multi-byte character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def feed(self, ids) -> str:
        self.ids += list(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return delta


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
    batching.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (default 16)")
    batching.add_argument("--max-active-rows", type=int, default=64, help="requests in progress at once")
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
    from .cli_chroma import load_model  # one loader for the CLI and the server (tiny random model by default)

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
    """`python -m openchroma.server_chroma ...` (the same options as `openchroma serve`)."""
    parser = add_serve_arguments(argparse.ArgumentParser(description="OpenAI-compatible server for Chroma"))
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
