# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Reading client conversation items (`conversation.item.create`, `response.create`'s `input`).

Accepted: user messages with `input_text` / `input_audio` (base64 PCM16 24 kHz) parts, system messages with
`input_text`, assistant messages with `output_text` / `text` (or an `output_audio` / `audio` part's transcript) for
history. Function calls and images are refused with an error naming the field.
"""

import base64
import binascii

from .config import RealtimeError, expect
from .events import Item, new_id, pcm16_to_float


USER_TEXT = ("input_text", "text")
ASSISTANT_TEXT = ("output_text", "text", "output_audio", "audio")


def read_item(raw, param: str, taken_ids: set) -> Item:
    expect(raw, dict, param, "an object")
    kind = raw.get("type", "message")
    if kind != "message":
        raise RealtimeError(f"'{param}.type': only 'message' items are supported (no tools), got {kind!r}.",
                            f"{param}.type", code="unsupported_value")
    role = raw.get("role")
    if role not in ("user", "assistant", "system"):
        raise RealtimeError(f"'{param}.role' must be 'user', 'assistant' or 'system'.", f"{param}.role")
    item_id = raw.get("id") or new_id("item")
    expect(item_id, str, f"{param}.id", "a string")
    if len(item_id) > 64 or item_id in taken_ids:
        raise RealtimeError(f"'{param}.id' must be a new id of at most 64 characters.", f"{param}.id",
                            code="invalid_item_id")
    content = expect(raw.get("content"), list, f"{param}.content", "a list of content parts")
    if not content:
        raise RealtimeError(f"'{param}.content' is empty.", f"{param}.content")
    parts = [read_part(part, f"{param}.content[{i}]", role) for i, part in enumerate(content)]
    if role == "assistant":
        return Item(id=item_id, role=role, kind="text", text="".join(p["text"] for p in parts))
    return Item(id=item_id, role=role, parts=parts)


def read_part(part, param: str, role: str) -> dict:
    expect(part, dict, param, "an object")
    kind = part.get("type")
    if role == "assistant" and kind in ASSISTANT_TEXT:
        text = part.get("text") if kind in ("output_text", "text") else part.get("transcript")
        return {"type": "text", "text": expect(text, str, f"{param}.{'text' if 'text' in kind else 'transcript'}",
                                               "a string")}
    if role in ("user", "system") and kind in USER_TEXT:
        return {"type": "input_text", "text": expect(part.get("text"), str, f"{param}.text", "a string")}
    if role == "user" and kind == "input_audio":
        audio = expect(part.get("audio"), str, f"{param}.audio", "base64 PCM16 24 kHz audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError(f"'{param}.audio' is not valid base64.", f"{param}.audio",
                                code="invalid_base64") from None
        if len(data) < 2 or len(data) % 2:
            raise RealtimeError(f"'{param}.audio' must hold whole 16-bit samples.", f"{param}.audio")
        return {"type": "input_audio", "audio": pcm16_to_float(data)}
    allowed = {"user": "input_text, input_audio", "system": "input_text",
               "assistant": "output_text, output_audio (transcript)"}[role]
    raise RealtimeError(f"'{param}.type': {kind!r} is not accepted in a {role} message (use {allowed}).",
                        f"{param}.type", code="unsupported_content")
