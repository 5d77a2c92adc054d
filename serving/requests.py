# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Reading requests: validated requests -> `GenerationJob`s (`RequestBuilder`, run on the "chroma-prep" thread;
it raises `APIError` for anything the client got wrong), and the small per-answer helpers.

Audio is read by the processor's own `load_audio` (one reader for the library and the server), with the server's
rules on top: client strings are base64 or data URIs; a path is read only inside an --allow-dir; a URL only when
fetched beforehand by `fetch.UrlFetcher` (--allow-url-fetch); every clip is measured against the per-clip and
per-request limits before it is decoded.

Not a hub file (needs the `server` extra).
"""

import base64
import binascii
import collections
import logging
import os
import secrets
import threading
import time
import urllib.parse
from typing import Dict, List, Optional

import numpy as np
import torch

from ..pipeline_chroma import SPEAK_REQUEST, SPEAK_SYSTEM_PROMPT
from ..processing_chroma import AudioLimitError, audio_string_kind, load_audio
from ..sampling_chroma import SamplingParams
from .engine import GenerationJob
from .fetch import fetch_failed
from .schemas import (
    SAMPLE_RATE, THINKER_RATE, APIError, ChatCompletionRequest, ChatMessage, SamplingFields, ServerSettings,
    SpeechRequest, bad_request,
)
from .voices import VoiceStore  # noqa: F401  (re-exported: the voice store used to live here)


logger = logging.getLogger("openchroma.server")

AUDIO_PART_TYPES = ("input_audio", "audio_url", "audio")
# A prompt holding more text characters than this many per allowed token is refused before it is tokenized
# (a token of the thinker's vocabulary rarely spans more than a few characters).
MAX_CHARS_PER_TOKEN = 16


def speech_conversation(text: str, instructions: Optional[str] = None) -> list:
    """The text-to-speech prompt, as the CLI and the text-to-speech pipeline write it (pipeline_chroma.py's
    SPEAK_SYSTEM_PROMPT and SPEAK_REQUEST); a request's `instructions` replace the system prompt."""
    return [{"role": "system", "content": instructions or SPEAK_SYSTEM_PROMPT},
            {"role": "user", "content": SPEAK_REQUEST.format(text=text)}]


def context_length_exceeded(tokens, limit, param) -> APIError:
    return bad_request(f"The prompt is {tokens} tokens long; this server accepts at most {limit} prompt tokens.",
                       param, code="context_length_exceeded")


class AudioBudget:
    """The audio seconds one request may still send (per clip and in total), spent clip by clip."""

    def __init__(self, settings: ServerSettings):
        self.per_clip, self.left = settings.max_audio_seconds, settings.max_total_audio_seconds

    def limit(self) -> float:
        return min(self.per_clip, self.left)

    def refusal(self, param, error: AudioLimitError) -> APIError:
        if self.left < self.per_clip and str(error).startswith("Audio longer than"):
            return bad_request(f"'{param}': the request's audio together is longer than the server's limit.",
                               param, code="audio_too_long")
        return bad_request(f"'{param}': {error}", param, code="audio_too_long")

    def spend(self, samples: int, rate: int):
        self.left -= samples / rate


# ----------------------------------------------------------------------------------------------------------------------
# Requests -> jobs (runs on the "chroma-prep" thread; raises APIError for anything the client got wrong)
# ----------------------------------------------------------------------------------------------------------------------


class RequestBuilder:
    """Reads a validated request into a `GenerationJob`: decodes audio under the server's rules, builds the
    conversation and runs the processor."""

    def __init__(self, processor, settings: ServerSettings, answers: "AnswerMemory", frame_samples: int = 1920,
                 max_prompt_tokens: int = 32768):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.settings = settings
        self.answers = answers
        self.frame_samples = frame_samples  # one Mimi frame at 24 kHz: the shortest usable voice
        self.context_tokens = max_prompt_tokens  # the thinker's own limit (settings.max_prompt_tokens may lower it)
        self.audio_token_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.settings.max_prompt_tokens or self.context_tokens, self.context_tokens)

    # -- audio sources -------------------------------------------------------------------------------------------

    def waveform(self, source, rate: int, param: str, budget: AudioBudget, fetched=None, base64_only=False,
                 format_hint: Optional[str] = None) -> np.ndarray:
        """A client audio source (a string, or uploaded bytes) -> mono float32 at `rate`, within `budget`. Bytes
        fetched from a URL that are not audio get the fetch error (the answer never tells what listens there)."""
        from_url = isinstance(source, str) and audio_string_kind(source) == "url"
        if isinstance(source, str):
            source = self.resolve_string(source, param, fetched or {}, base64_only)
        if format_hint in ("pcm16", "pcm"):  # raw 24 kHz 16-bit samples (OpenAI's streaming format)
            source = (np.frombuffer(source[: len(source) // 2 * 2], dtype="<i2"), SAMPLE_RATE)
        try:
            wave = load_audio(source, rate, allow_local_files=False, max_seconds=budget.limit())
        except AudioLimitError as error:
            raise budget.refusal(param, error) from None
        except ValueError as error:
            if from_url:
                raise fetch_failed(param) from None
            raise bad_request(f"'{param}' is not audio the server can decode: {error}", param,
                              code="invalid_audio") from None
        budget.spend(len(wave), rate)
        return wave

    def resolve_string(self, text: str, param: str, fetched: Dict[str, bytes], base64_only: bool):
        """A client string -> what load_audio may read: the string itself (base64, data URI) or the bytes of an
        allowed file or of a URL fetched beforehand."""
        if not isinstance(text, str) or not text.strip():
            raise bad_request(f"'{param}' must be a non-empty string of base64 audio.", param)
        text = text.strip()
        kind = audio_string_kind(text)
        if kind in ("data", "base64"):
            return text
        if base64_only:
            raise bad_request(f"'{param}' is not valid base64 audio.", param, code="invalid_base64")
        if kind == "url":
            if not self.settings.allow_url_fetch:
                raise bad_request(f"'{param}': fetching audio from URLs is disabled on this server; send base64 audio.",
                                  param, code="url_fetch_disabled")
            if text not in fetched:
                raise fetch_failed(param)
            return fetched[text]
        if self.settings.allow_dirs:
            return self.read_allowed_file(text, param)
        raise bad_request(
            f"'{param}' is neither base64 audio nor a data URI (file paths and URLs are not accepted unless the "
            "operator enables --allow-dir / --allow-url-fetch).", param, code="invalid_audio_source")

    def read_allowed_file(self, text: str, param: str) -> bytes:
        """A path (relative ones inside each allowed directory) or file:// URL -> the file's bytes."""
        name = urllib.parse.unquote(urllib.parse.urlparse(text).path) if text.startswith("file:") else text
        not_allowed = bad_request(f"'{param}': no such file inside the allowed directories.", param,
                                  code="file_not_allowed")
        if "\x00" in name:
            raise not_allowed
        for folder in self.settings.allow_dirs:
            root = os.path.realpath(folder)
            path = os.path.realpath(os.path.join(root, name))
            if os.path.commonpath([root, path]) == root and os.path.isfile(path):
                if os.path.getsize(path) > self.settings.max_body_bytes:
                    raise APIError(413, f"'{param}': the file is larger than the server's limit.", param,
                                   code="file_too_large")
                with open(path, "rb") as file:
                    return file.read()
        raise not_allowed

    def reference(self, audio, text: Optional[str], audio_param: str, text_param: str, budget: AudioBudget,
                  fetched=None):
        """Per-request reference voice -> (24 kHz waveform tensor [T], transcript ids [P]) or None."""
        if audio is None and text is None:
            return None
        if audio is None or text is None or not str(text).strip():
            raise bad_request(f"Give both '{audio_param}' (the reference recording) and '{text_param}' (its exact "
                              "transcript), or neither.", audio_param if audio is None else text_param)
        if len(text) > self.settings.max_input_chars:
            raise bad_request(f"'{text_param}' is longer than {self.settings.max_input_chars} characters.", text_param)
        wave = self.waveform(audio, SAMPLE_RATE, audio_param, budget, fetched)
        if len(wave) < self.frame_samples:
            raise bad_request(f"'{audio_param}': a reference voice must last at least one audio frame "
                              f"({self.frame_samples / SAMPLE_RATE * 1000:.0f} ms).", audio_param, code="audio_too_short")
        ids = self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        return torch.from_numpy(wave), torch.tensor(ids, dtype=torch.long)

    # -- conversations -----------------------------------------------------------------------------------------

    def check_chat_size(self, body: ChatCompletionRequest):
        """Cheap counts before anything is decoded or tokenized: messages, audio parts, text characters."""
        settings = self.settings
        if len(body.messages) > settings.max_messages:
            raise bad_request(f"At most {settings.max_messages} messages are accepted.", "messages",
                              code="too_many_messages")
        parts = int(body.prompt_audio is not None)
        chars = 0
        for message in body.messages:
            if isinstance(message.content, str):
                chars += len(message.content)
            for item in message.content if isinstance(message.content, list) else ():
                parts += item.get("type") in AUDIO_PART_TYPES
                chars += len(item["text"]) if isinstance(item.get("text"), str) else 0
        if parts > settings.max_audio_parts:
            raise bad_request(f"At most {settings.max_audio_parts} audio clips are accepted per request.",
                              "messages", code="too_many_audio_parts")
        if chars > self.max_prompt_tokens * MAX_CHARS_PER_TOKEN:
            raise context_length_exceeded(f"more than {self.max_prompt_tokens}", self.max_prompt_tokens, "messages")

    def audio_urls(self, body) -> List[tuple]:
        """(url, param) of every http(s) audio source of a request, to fetch before it is read."""
        found = []
        for param, text in self.audio_strings(body):
            if isinstance(text, str) and audio_string_kind(text) == "url":
                found.append((text.strip(), param))
        return found

    @staticmethod
    def audio_strings(body):
        for name in ("prompt_audio", "ref_audio"):
            if isinstance(getattr(body, name, None), str):
                yield name, getattr(body, name)
        for i, message in enumerate(getattr(body, "messages", None) or ()):
            for j, item in enumerate(message.content if isinstance(message.content, list) else ()):
                param = f"messages[{i}].content[{j}]"
                if item.get("type") == "audio":
                    yield f"{param}.audio", item.get("audio")
                elif item.get("type") == "audio_url" and isinstance(item.get("audio_url"), dict):
                    yield f"{param}.audio_url.url", item["audio_url"].get("url")

    def conversation(self, messages: List[ChatMessage], budget: AudioBudget, fetched) -> list:
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
                items = [self.content_item(item, f"{param}.content[{j}]", role, budget, fetched)
                         for j, item in enumerate(message.content)]
                conversation.append({"role": role, "content": items})
        return conversation

    def assistant_text(self, message: ChatMessage, param: str) -> str:
        """A previous answer: its text content, or the transcript of its audio id."""
        if isinstance(message.content, str):
            return message.content
        if isinstance(message.content, list):
            parts = [self.content_item(item, f"{param}.content[{j}]", "assistant", None, None) for j, item in
                     enumerate(message.content)]
            return "".join(part["text"] for part in parts)
        if message.audio is not None:
            transcript = self.answers.transcript(message.audio.id)
            if transcript is None:
                raise bad_request(f"'{param}.audio.id': unknown or expired audio id.", f"{param}.audio.id",
                                  code="audio_not_found")
            return transcript
        raise bad_request(f"'{param}' needs 'content' or 'audio': {{'id': ...}}.", param)

    def content_item(self, item: dict, param: str, role: str, budget: Optional[AudioBudget], fetched) -> dict:
        kind = item.get("type")
        if kind in ("text", "input_text"):
            if not isinstance(item.get("text"), str):
                raise bad_request(f"'{param}.text' must be a string.", f"{param}.text")
            return {"type": "text", "text": item["text"]}
        if kind in AUDIO_PART_TYPES and role != "user":
            raise bad_request(f"'{param}': audio is only accepted in user messages.", param)
        if kind == "input_audio":
            payload = item.get("input_audio")
            if not isinstance(payload, dict) or not isinstance(payload.get("data"), str):
                raise bad_request(f"'{param}.input_audio' must be {{'data': <base64>, 'format': 'wav'|'mp3'}}.",
                                  f"{param}.input_audio")
            source, hint = payload["data"], payload.get("format")
            if hint in ("pcm16", "pcm"):
                source = decode_base64(source, f"{param}.input_audio.data")
            wave = self.waveform(source, THINKER_RATE, f"{param}.input_audio.data", budget, fetched,
                                 base64_only=True, format_hint=hint)
            return {"type": "audio", "audio": (wave, THINKER_RATE)}
        if kind in ("audio_url", "audio"):  # OpenAI-style audio_url, Chroma-SGLang's {"type": "audio", "audio": ...}
            source_param = f"{param}.audio_url.url" if kind == "audio_url" else f"{param}.audio"
            source = item.get("audio_url").get("url") if isinstance(item.get("audio_url"), dict) else item.get("audio")
            if not isinstance(source, str):
                raise bad_request(f"'{source_param}' must be a string: base64, a data URI, a path inside an allowed "
                                  "directory or an http(s) URL.", source_param)
            wave = self.waveform(source, THINKER_RATE, source_param, budget, fetched)
            return {"type": "audio", "audio": (wave, THINKER_RATE)}
        raise bad_request(f"'{param}': unsupported content type (use 'text', 'input_audio' or 'audio').",
                          f"{param}.type", code="unsupported_content")

    def thinker_inputs(self, conversation, param: str = "messages") -> Dict[str, torch.Tensor]:
        try:
            inputs = self.processor(conversation)
        except ValueError as error:
            raise bad_request(f"Invalid conversation: {error}", param) from None
        tokens = int(inputs["thinker_attention_mask"].sum())
        if tokens > self.max_prompt_tokens:
            raise context_length_exceeded(tokens, self.max_prompt_tokens, param)
        return {k: v for k, v in inputs.items() if k.startswith("thinker_")}

    # -- jobs ------------------------------------------------------------------------------------------------------

    def limits(self, body, max_text_tokens=None, want_audio=True):
        """-> (audio frames, text tokens) the request may use. A text-only answer ends with its text, so its only
        frame bound is the server's (one frame per half text token)."""
        frames = body.max_audio_frames or (self.settings.default_max_frames if want_audio else self.settings.max_frames)
        if frames > self.settings.max_frames:
            raise bad_request(f"'max_audio_frames' must be at most {self.settings.max_frames}.", "max_audio_frames")
        if max_text_tokens is not None and max_text_tokens > self.settings.max_text_tokens:
            raise bad_request(f"'max_completion_tokens' must be at most {self.settings.max_text_tokens}.",
                              "max_completion_tokens")
        return frames, max_text_tokens

    def chat_job(self, body: ChatCompletionRequest, voice, want_audio: bool, sink, generation_config,
                 fetched=None) -> GenerationJob:
        frames, text_limit = self.limits(body, body.max_completion_tokens or body.max_tokens, want_audio)
        budget = AudioBudget(self.settings)
        reference = self.reference(body.prompt_audio, body.prompt_text, "prompt_audio", "prompt_text", budget,
                                   fetched)
        inputs = self.thinker_inputs(self.conversation(body.messages, budget, fetched))
        return GenerationJob(
            kind="chat", thinker_inputs=inputs, sink=sink, voice=None if reference else voice, reference=reference,
            max_frames=frames, max_text_tokens=text_limit, sampling=sampling_params(body, generation_config),
            seed=body.seed, want_audio=want_audio,
        )

    def speech_job(self, body: SpeechRequest, voice, sink, generation_config, fetched=None) -> GenerationJob:
        text = body.input.strip()
        if not text:
            raise bad_request("'input' is empty: give the text to speak.", "input", code="empty_input")
        if len(text) > self.settings.max_input_chars:
            raise bad_request(f"'input' is longer than {self.settings.max_input_chars} characters.", "input")
        if body.instructions is not None and len(body.instructions) > self.settings.max_instructions_chars:
            raise bad_request(f"'instructions' is longer than {self.settings.max_instructions_chars} characters.",
                              "instructions")
        frames, _ = self.limits(body)
        audio, transcript = body.prompt_audio or body.ref_audio, body.prompt_text or body.ref_text
        reference = self.reference(audio, transcript, "prompt_audio", "prompt_text", AudioBudget(self.settings),
                                   fetched)
        inputs = self.thinker_inputs(speech_conversation(text, body.instructions), "input")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return GenerationJob(
            kind="speech", thinker_inputs=inputs, sink=sink, voice=None if reference else voice, reference=reference,
            forced_text_ids=torch.tensor(ids), max_frames=frames, sampling=sampling_params(body, generation_config),
            seed=body.seed,
        )

    def voice_reference(self, source, transcript: str, param: str = "audio_sample", fetched=None):
        """An uploaded voice (bytes, or a client string) -> (24 kHz waveform tensor [T], transcript ids [P]), at
        least one frame long."""
        return self.reference(source, transcript, param, "transcript", AudioBudget(self.settings), fetched)

    def prompt_usage(self, job: GenerationJob) -> tuple:
        """-> (prompt tokens, audio tokens among them)."""
        ids = job.thinker_inputs["thinker_input_ids"][job.thinker_inputs["thinker_attention_mask"].bool()]
        return int(ids.numel()), int((ids == self.audio_token_id).sum())


def decode_base64(payload: str, param: str) -> bytes:
    """Raw pcm16 audio sent as base64 (no container for load_audio to read)."""
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
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


