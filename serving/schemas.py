# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""The server's settings, errors (OpenAI's JSON shape), request schemas and audio output encodings.

Not a hub file (needs the `server` extra); `app.py` builds the app from these.
"""

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import numpy as np
import soundfile as sf
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


SAMPLE_RATE = 24000  # Mimi's rate: every audio answer is 24 kHz mono
THINKER_RATE = 16000  # the thinker's audio front end (Whisper features)
# OpenAI's built-in voice names: they resolve to the server's default voice unless a voice with that id exists
OPENAI_VOICE_NAMES = frozenset(
    "alloy ash ballad coral echo fable nova onyx sage shimmer verse marin cedar".split()
)
VOICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class ServerSettings:
    """What the operator decides; everything a request may ask for is bounded here."""

    model_name: str = "chroma-4b"  # the id /v1/models lists and requests name
    model_aliases: tuple = ()  # other accepted `model` values (e.g. the hub id, more --served-model-name values)
    api_key: Optional[str] = None  # when set: required on /v1 and on the API docs (/docs, /redoc, /openapi.json)
    voices_dir: Optional[Path] = None  # None: voices live in memory only
    default_voice: Optional[str] = None  # voice id used when a request names none (or an OpenAI built-in name)
    allow_dirs: tuple = ()  # directories whose files `prompt_audio` / audio content parts may name
    allow_url_fetch: bool = False
    allow_private_urls: bool = False  # let URL fetching reach loopback, private and link-local addresses
    url_fetch_timeout_s: float = 15.0  # total deadline of one fetch (connect, headers and body)
    max_body_bytes: int = 32 * 1024 * 1024  # also the size cap of a fetched URL and of an allowed file
    body_timeout_s: float = 60.0  # a request body must arrive within this (slow uploads get 408)
    header_timeout_s: float = 10.0  # a connection must send a complete request head within this
    max_audio_seconds: float = 60.0  # per clip (user audio and reference voices)
    max_total_audio_seconds: float = 120.0  # all clips of one request together
    max_audio_parts: int = 16  # audio content parts (+ prompt_audio) per request
    max_messages: int = 256  # messages per chat request
    max_prompt_tokens: Optional[int] = None  # thinker prompt tokens; None: the thinker's context minus the answer
    max_input_chars: int = 4096  # /v1/audio/speech input
    max_instructions_chars: int = 4096  # /v1/audio/speech instructions
    default_max_frames: int = 1000  # audio frames per answer when the request sets none (80 ms each)
    max_frames: int = 2000  # upper bound a request may ask for
    max_text_tokens: int = 1024  # upper bound on max_completion_tokens / max_tokens
    audio_ttl_s: int = 3600  # how long an answer's audio id can be referenced in a later turn
    drain_s: float = 10.0  # on SIGTERM: how long in-flight answers may finish before they are ended


# ----------------------------------------------------------------------------------------------------------------------
# Errors (OpenAI's shape: {"error": {"message", "type", "param", "code"}})
# ----------------------------------------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.close = close  # answer with `Connection: close` (the rest of the request was not read)


def error_body(message, type="invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    headers = {"Connection": "close"} if error.close else None
    return JSONResponse(error_body(error.message, error.type, error.param, error.code), status_code=error.status,
                        headers=headers)


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


