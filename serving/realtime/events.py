# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Server events of the Realtime protocol, in the socket's dialect.

The GA protocol renamed some events and content types of the beta (preview) protocol; a socket speaking the beta
dialect gets the old names, a GA socket the new ones (never both, so no client sees a delta twice):

    GA                                        beta
    response.output_audio.delta / .done       response.audio.delta / .done
    response.output_audio_transcript.*        response.audio_transcript.*
    response.output_text.delta / .done        response.text.delta / .done
    conversation.item.added / .done           (not sent; conversation.item.created is sent to both)
    content types output_audio, output_text   audio, text
"""

import secrets
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np


BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}
GA_ONLY = frozenset({"conversation.item.added", "conversation.item.done"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def event_name(name: str, dialect: str) -> Optional[str]:
    """The GA event name in `dialect`; None when the dialect has no such event."""
    if dialect == "beta":
        return None if name in GA_ONLY else BETA_NAMES.get(name, name)
    return name


def error_event(message: str, type: str = "invalid_request_error", code: Optional[str] = None,
                param: Optional[str] = None, event_id: Optional[str] = None) -> dict:
    """An `error` event; `event_id` names the client event that caused it."""
    return {"type": "error", "error": {"type": type, "code": code, "message": message, "param": param,
                                        "event_id": event_id}}


@dataclass
class Item:
    """One conversation item. User audio is kept as 24 kHz float samples; an assistant message keeps its text ids
    with the audio position where each arrived, so that truncation can keep only the text spoken before a point."""

    id: str
    role: str  # "user" | "assistant" | "system"
    parts: List[dict] = field(default_factory=list)  # [{"type": "input_audio", "audio": np [n]} | {"type": ..., "text"}]
    status: str = "completed"
    # assistant answers
    kind: str = "audio"  # "audio" or "text" (the response's modality)
    text: str = ""
    text_ids: List[int] = field(default_factory=list)
    text_positions: List[int] = field(default_factory=list)  # per text id: audio samples sent before it arrived
    audio_samples: int = 0

    def to_json(self, dialect: str) -> dict:
        return {"id": self.id, "object": "realtime.item", "type": "message", "role": self.role,
                "status": self.status, "content": self.content_json(dialect)}

    def content_json(self, dialect: str) -> list:
        if self.role == "assistant":
            return [self.part_json(dialect)] if (self.text or self.audio_samples or self.status != "in_progress") else []
        content = []
        for part in self.parts:
            if part["type"] == "input_audio":
                content.append({"type": "input_audio", "transcript": None})
            else:
                content.append({"type": part["type"], "text": part["text"]})
        return content

    def part_json(self, dialect: str) -> dict:
        """The assistant's content part (no audio bytes: those went out as deltas)."""
        if self.kind == "audio":
            return {"type": "audio" if dialect == "beta" else "output_audio", "transcript": self.text}
        return {"type": "text" if dialect == "beta" else "output_text", "text": self.text}

    def conversation_message(self) -> Optional[dict]:
        """-> the processor's message for this item, or None when it holds nothing."""
        if self.role == "assistant":
            return {"role": "assistant", "content": self.text} if self.text else None
        content = []
        for part in self.parts:
            if part["type"] == "input_audio":
                content.append({"type": "audio", "audio": (part["audio"], 24000)})
            else:
                content.append({"type": "text", "text": part["text"]})
        if self.role == "system":
            return {"role": "system", "content": "".join(p["text"] for p in content)}
        return {"role": self.role, "content": content} if content else None


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian PCM16 -> float32 in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
