# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Realtime session configuration: the operator's limits (`RealtimeSettings`), one socket's settings
(`SessionConfig`), reading `session.update` in both protocol dialects and writing the session back.

Two dialects of the OpenAI Realtime protocol are spoken, chosen per socket:
    "ga"   the current protocol: `session: {"type": "realtime", "audio": {"input": ..., "output": ...}, ...}`
    "beta" the preview protocol (clients sending `OpenAI-Beta: realtime=v1`, or a flat `session.update`):
           `session: {"voice", "turn_detection", "input_audio_format": "pcm16", "modalities", ...}`
Both are read into the same `SessionConfig`; server events carry the dialect's names (see events.py).
"""

from dataclasses import dataclass, field, replace
from typing import Optional, Union


SAMPLE_RATE = 24000  # every realtime audio stream: PCM16 mono 24 kHz, little-endian
DEFAULT_INSTRUCTIONS = (  # the system prompt of the published model card
    "You are Chroma, an advanced virtual human created by the FlashLabs. "
    "You possess the ability to understand auditory inputs and generate both text and speech."
)
# session fields that are accepted and echoed but change nothing here (tools are refused when non-empty)
IGNORED_FIELDS = frozenset({"model", "tracing", "include", "prompt", "truncation", "tool_choice", "object", "id",
                            "expires_at", "client_secret", "input_audio_noise_reduction", "reasoning",
                            "parallel_tool_calls"})


class RealtimeError(Exception):
    """A client mistake, answered with an `error` event (the socket stays open)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = "invalid_value",
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.type = message, param, code, type


@dataclass
class RealtimeSettings:
    """What the operator bounds (`openchroma serve --realtime-*`)."""

    max_sessions: int = 16  # open sockets per server; more are refused with an `error` event, then closed
    max_session_s: float = 30 * 60  # a session ends (error `session_expired`, then close) after this long
    max_buffer_s: float = 60.0  # audio held in the input buffer (server VAD drops the silence before speech)
    max_event_bytes: int = 8 * 1024 * 1024  # one client event
    max_items: int = 200  # conversation items per session


@dataclass
class TurnDetection:
    """Server VAD (silero-vad): speech above `threshold` starts a turn, `silence_duration_ms` below ends it."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    def to_json(self) -> dict:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
                "interrupt_response": self.interrupt_response, "idle_timeout_ms": None}


@dataclass
class SessionConfig:
    """One socket's settings. Sampling fields are extensions (OpenAI's GA session has none)."""

    model: str
    voice: Optional[str]
    instructions: str = DEFAULT_INSTRUCTIONS
    output_modalities: tuple = ("audio",)
    turn_detection: Optional[TurnDetection] = field(default_factory=TurnDetection)
    max_output_tokens: Union[int, str] = "inf"  # audio frames (80 ms) of one response, or "inf" (server default)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    transcription: Optional[dict] = None  # accepted and echoed; no input transcription is produced


# ----------------------------------------------------------------------------------------------------------------------
# Reading session.update / response.create parameters
# ----------------------------------------------------------------------------------------------------------------------


def expect(value, kinds, param: str, what: str):
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise RealtimeError(f"'{param}' must be {what}.", param)
    if not isinstance(value, kinds):
        raise RealtimeError(f"'{param}' must be {what}.", param)
    return value


def read_pcm_format(value, param: str):
    """Only PCM16 at 24 kHz: {"type": "audio/pcm", "rate": 24000} (GA) or "pcm16" (beta)."""
    if value == "pcm16":
        return
    if isinstance(value, dict) and value.get("type") == "audio/pcm" and value.get("rate", SAMPLE_RATE) == SAMPLE_RATE:
        return
    raise RealtimeError(f"'{param}': only PCM16 mono at 24 kHz is supported ({{\"type\": \"audio/pcm\", \"rate\": "
                        "24000}, or \"pcm16\").", param, code="unsupported_audio_format")


def read_turn_detection(value, current: Optional[TurnDetection], param: str) -> Optional[TurnDetection]:
    if value is None:
        return None
    expect(value, dict, param, "an object or null")
    kind = value.get("type", "server_vad")
    if kind != "server_vad":
        raise RealtimeError(f"'{param}.type': only 'server_vad' (or null) is supported, got {kind!r}.",
                            f"{param}.type", code="unsupported_value")
    detection = replace(current) if current is not None else TurnDetection()
    for name, kinds, what in (("threshold", (int, float), "a number in [0, 1]"),
                              ("prefix_padding_ms", int, "an integer in [0, 5000]"),
                              ("silence_duration_ms", int, "an integer in [32, 10000]"),
                              ("create_response", bool, "true or false"),
                              ("interrupt_response", bool, "true or false")):
        if value.get(name) is not None:
            setattr(detection, name, expect(value[name], kinds, f"{param}.{name}", what))
    if not 0.0 <= detection.threshold <= 1.0:
        raise RealtimeError(f"'{param}.threshold' must be in [0, 1].", f"{param}.threshold")
    if not 0 <= detection.prefix_padding_ms <= 5000:
        raise RealtimeError(f"'{param}.prefix_padding_ms' must be in [0, 5000].", f"{param}.prefix_padding_ms")
    if not 32 <= detection.silence_duration_ms <= 10000:
        raise RealtimeError(f"'{param}.silence_duration_ms' must be in [32, 10000].", f"{param}.silence_duration_ms")
    return detection


def read_voice(value, param: str) -> str:
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return value["id"]
    return expect(value, str, param, "a voice id (string) or {\"id\": ...}")


def read_modalities(value, param: str) -> tuple:
    expect(value, list, param, "a list: [\"audio\"] or [\"text\"]")
    if set(value) in ({"audio"}, {"audio", "text"}):  # beta clients send ["text", "audio"] for audio + transcript
        return ("audio",)
    if value == ["text"]:
        return ("text",)
    raise RealtimeError(f"'{param}' must be [\"audio\"] or [\"text\"].", param)


def read_max_tokens(value, param: str, limit: int):
    if value == "inf":
        return "inf"
    expect(value, int, param, f"an integer in [1, {limit}] or \"inf\"")
    if not 1 <= value <= limit:
        raise RealtimeError(f"'{param}' must be in [1, {limit}] (audio frames of 80 ms) or \"inf\".", param)
    return value


def read_sampling(config, body: dict, prefix: str):
    """Extensions: temperature (0 = greedy), top_p, top_k, seed at the top level of the session or response."""
    checks = {"temperature": ((int, float), lambda v: 0 <= v <= 2, "a number in [0, 2]"),
              "top_p": ((int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
              "top_k": (int, lambda v: v >= 0, "a non-negative integer"),
              "seed": (int, lambda v: 0 <= v < 2**63, "a non-negative integer")}
    for name, (kinds, valid, what) in checks.items():
        if body.get(name) is not None:
            value = expect(body[name], kinds, prefix + name, what)
            if not valid(value):
                raise RealtimeError(f"'{prefix}{name}' must be {what}.", prefix + name)
            setattr(config, name, value)


def read_tools(value, param: str):
    if value:
        raise RealtimeError(f"'{param}': tools are not supported by Chroma.", param, code="unsupported_value")


def apply_session_update(config: SessionConfig, session, max_frames: int) -> SessionConfig:
    """-> a new SessionConfig with `session` (GA or beta shape) applied; RealtimeError for anything invalid.
    Nothing changes unless the whole update is valid."""
    expect(session, dict, "session", "an object")
    new = replace(config)
    kind = session.get("type", "realtime")
    if kind != "realtime":
        raise RealtimeError(f"'session.type': only 'realtime' sessions are served, got {kind!r}.", "session.type",
                            code="unsupported_value")
    read_sampling(new, session, "session.")
    for name, value in session.items():
        param = f"session.{name}"
        if name in IGNORED_FIELDS or name in ("type", "temperature", "top_p", "top_k", "seed"):
            continue
        if name == "instructions":
            new.instructions = expect(value, str, param, "a string")
        elif name in ("output_modalities", "modalities"):
            new.output_modalities = read_modalities(value, param)
        elif name in ("max_output_tokens", "max_response_output_tokens"):
            new.max_output_tokens = read_max_tokens(value, param, max_frames)
        elif name == "tools":
            read_tools(value, param)
        elif name == "audio":
            apply_audio_config(new, expect(value, dict, param, "an object"))
        elif name == "voice":  # beta
            new.voice = read_voice(value, param)
        elif name == "turn_detection":  # beta
            new.turn_detection = read_turn_detection(value, config.turn_detection, param)
        elif name in ("input_audio_format", "output_audio_format"):  # beta
            read_pcm_format(value, param)
        elif name == "input_audio_transcription":  # beta
            new.transcription = value
        elif name == "speed":
            check_speed(value, param)
        else:
            raise RealtimeError(f"Unknown parameter '{param}'.", param, code="unknown_parameter")
    return new


def check_speed(value, param: str):
    if value not in (None, 1, 1.0):
        raise RealtimeError(f"'{param}': only speed 1.0 is supported.", param, code="unsupported_value")


def apply_audio_config(config: SessionConfig, audio: dict):
    """GA `session.audio`: {"input": {format, turn_detection, transcription, noise_reduction},
    "output": {format, voice, speed}}."""
    for side in audio:
        if side not in ("input", "output"):
            raise RealtimeError(f"Unknown parameter 'session.audio.{side}'.", f"session.audio.{side}",
                                code="unknown_parameter")
    inputs = expect(audio.get("input") or {}, dict, "session.audio.input", "an object")
    outputs = expect(audio.get("output") or {}, dict, "session.audio.output", "an object")
    for name, value in inputs.items():
        param = f"session.audio.input.{name}"
        if name == "format":
            read_pcm_format(value, param)
        elif name == "turn_detection":
            config.turn_detection = read_turn_detection(value, config.turn_detection, param)
        elif name == "transcription":
            config.transcription = value
        elif name != "noise_reduction":
            raise RealtimeError(f"Unknown parameter '{param}'.", param, code="unknown_parameter")
    for name, value in outputs.items():
        param = f"session.audio.output.{name}"
        if name == "format":
            read_pcm_format(value, param)
        elif name == "voice":
            config.voice = read_voice(value, param)
        elif name == "speed":
            check_speed(value, param)
        else:
            raise RealtimeError(f"Unknown parameter '{param}'.", param, code="unknown_parameter")


# ----------------------------------------------------------------------------------------------------------------------
# Writing the session back (session.created / session.updated)
# ----------------------------------------------------------------------------------------------------------------------


def session_json(config: SessionConfig, session_id: str, dialect: str, expires_at: int) -> dict:
    detection = config.turn_detection.to_json() if config.turn_detection is not None else None
    sampling = {name: getattr(config, name) for name in ("temperature", "top_p", "top_k", "seed")}
    if dialect == "beta":
        return {"id": session_id, "object": "realtime.session", "model": config.model,
                "modalities": ["text", "audio"] if config.output_modalities == ("audio",) else ["text"],
                "instructions": config.instructions, "voice": config.voice, "input_audio_format": "pcm16",
                "output_audio_format": "pcm16", "input_audio_transcription": config.transcription,
                "turn_detection": detection, "tools": [], "tool_choice": "none",
                "max_response_output_tokens": config.max_output_tokens, "expires_at": expires_at, **sampling}
    pcm = {"type": "audio/pcm", "rate": SAMPLE_RATE}
    return {"type": "realtime", "object": "realtime.session", "id": session_id, "model": config.model,
            "output_modalities": list(config.output_modalities), "instructions": config.instructions,
            "audio": {"input": {"format": pcm, "transcription": config.transcription, "noise_reduction": None,
                                "turn_detection": detection},
                      "output": {"format": pcm, "voice": config.voice, "speed": 1.0}},
            "tools": [], "tool_choice": "none", "max_output_tokens": config.max_output_tokens,
            "expires_at": expires_at, **sampling}
