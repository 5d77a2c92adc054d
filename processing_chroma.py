# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Processor of Chroma 1.0: conversations and a reference voice in, model inputs out; model outputs back to text/audio.

`ChromaProcessor` pairs the two Qwen2.5-Omni input pieces Chroma's thinker was trained with, a Qwen2 tokenizer and a
`WhisperFeatureExtractor` (128 mel bins, 16 kHz, hop 160, n_fft 400), with the reference-voice inputs of the speech
generator (24 kHz waveforms for Mimi). No vision processor: Chroma never looks at images or video.

What one call returns for B conversations (A = number of audio clips in all conversations together, in order)::

    thinker_input_ids              [B, S]        chat-template ids, <|AUDIO|> expanded; LEFT padded with the pad id
    thinker_attention_mask         [B, S]        1 = token, 0 = left padding
    thinker_input_features         [A, 128, M]   float32 log-mel of every user clip, M = frames of the longest clip
    thinker_feature_attention_mask [A, M]        int64, 1 = valid mel frame (right padding)
    input_ids                      [B, P]        reference transcript (prompt_text), no special tokens; LEFT padded
    attention_mask                 [B, P]
    input_values                   [B, 1, T]     float32 reference voice at 24 kHz, right zero-padded to the longest
    input_values_cutoffs           [B]           int64 valid sample count of every reference clip

The two feature keys are left out when no conversation holds audio; the four reference keys are left out when no
`prompt_audio`/`prompt_text` is given. Left padding keeps the last prompt position of every row aligned for
generation; the model derives positions and masks per row from the attention masks, so a padded row behaves as
if it were run alone.

Audio sources (user clips and reference voices) are described in [`load_audio`]. This file imports only the standard
library, numpy, torch, transformers, librosa and soundfile (it is served as remote code).
"""

import base64
import binascii
import io
import math
import os
import re
import tempfile
import urllib.parse
import urllib.request
import warnings

import librosa
import numpy as np
import soundfile as sf
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging


logger = logging.get_logger(__name__)

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS_TOKEN = "<|audio_bos|>"
AUDIO_EOS_TOKEN = "<|audio_eos|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Sampling rate of the Mimi codec: reference voices are resampled to it and generated audio comes out at it.
CODEC_SAMPLING_RATE = 24000
# Seconds to wait for a server when URL fetching is enabled.
URL_FETCH_TIMEOUT_S = 30
# A plain string at least this long made only of base64 characters is read as base64 audio (a WAV header alone
# is 44 bytes = 60 base64 characters); shorter strings are taken for file names.
MIN_BASE64_AUDIO_CHARS = 64
# With `max_seconds`, load_audio refuses sources holding more samples (all channels) than max_seconds of this rate
# (48 kHz stereo), before decoding or resampling them: an 8-channel 655 kHz file is refused from its header.
DECODE_BUDGET_SAMPLES_PER_SECOND = 2 * 48000

# ChatML as in Qwen2.5-Omni (docs/architecture.md): a default system turn when the conversation does not open with one, audio
# items become <|audio_bos|><|AUDIO|><|audio_eos|>, and the generation prompt opens the assistant turn. The processor
# expands each <|AUDIO|> to the clip's number of audio tokens after rendering.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- elif item['type'] == 'audio' or item['type'] == 'input_audio' -%}"
    "{{- '<|audio_bos|><|AUDIO|><|audio_eos|>' -}}"
    "{%- else -%}"
    "{{- raise_exception('Unsupported content item type: ' + item['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def num_audio_tokens(num_mel_frames: int) -> int:
    """Audio placeholder tokens the thinker's audio encoder produces for `num_mel_frames` valid mel frames.

    The encoder halves the frame rate twice (a stride-2 convolution, then 2x average pooling), as in Qwen2.5-Omni:
    100 mel frames per second become 25 tokens per second.
    """
    after_conv = (num_mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


# ---------------------------------------------------------------------------------------------------------------------
# Audio loading
# ---------------------------------------------------------------------------------------------------------------------


class AudioLimitError(ValueError):
    """An audio source exceeds the `max_seconds` budget of [`load_audio`] (refused before it is decoded)."""


def load_audio(
    source,
    sampling_rate: int,
    allow_url_fetch: bool = False,
    max_seconds: float | None = None,
    allow_local_files: bool = True,
) -> np.ndarray:
    """Decode one audio source to a mono float32 waveform [T] at `sampling_rate` (librosa resampling).

    Accepted sources:
        - a file path (`str` or `os.PathLike`) or a ``file://`` URL: any format soundfile reads (wav, flac, ogg,
          mp3, ...); librosa/audioread (e.g. ffmpeg) is tried for the rest;
        - ``data:audio/<fmt>;base64,<data>`` URIs and raw base64 strings of an encoded file, and the encoded
          file's `bytes`;
        - ``http(s)://`` URLs, only with `allow_url_fetch=True`;
        - a waveform with its sampling rate: a tuple ``(array, sampling_rate)`` or a dict
          ``{"array": array, "sampling_rate": sampling_rate}`` (numpy array or torch tensor, float or integer PCM).
          A bare array has no rate and is refused: the rate is never guessed;
        - a dict with ``"path"``, ``"url"``, ``"bytes"`` or ``"data"`` (base64, never read as a path).

    Channel convention for arrays: 1-D is mono [T]; 2-D is channels first [C, T] (the torch/torchaudio layout;
    a soundfile array [T, C] must be transposed). Channels are averaged to mono; so are the channels of files.

    Args:
        max_seconds (`float`, *optional*): refuse (`AudioLimitError`) audio longer than this, and audio holding more
            samples over all its channels than `max_seconds` of 48 kHz stereo, *before* decoding or resampling it:
            files are measured from their header (soundfile) or, for formats only ffmpeg/audioread read, from
            audioread's probe, and their decoding stops at `max_seconds` whatever the header claims.
        allow_local_files (`bool`, defaults to `True`): with `False`, strings are read only as data URIs or base64
            (never as paths or ``file://`` URLs), as a server reading client strings needs.

    Raises:
        ValueError: unreadable or non-audio data, invalid base64, missing sampling rate, empty audio, NaN/Inf
            samples, URL fetching not enabled; `AudioLimitError` (a ValueError) over `max_seconds`.
    """
    reader = _AudioReader(allow_url_fetch, max_seconds, allow_local_files)
    waveform, source_rate = reader.read(source)
    if waveform.shape[-1] == 0:
        raise ValueError(f"Empty audio: {_describe(source)} holds no samples.")
    reader.check(waveform.shape[-1], waveform.shape[0], source_rate)  # decoders may hold more than announced
    if not np.isfinite(waveform).all():
        raise ValueError(f"Audio {_describe(source)} contains NaN or Inf samples.")
    waveform = waveform.mean(axis=0)
    if source_rate != sampling_rate:
        waveform = librosa.resample(waveform, orig_sr=source_rate, target_sr=sampling_rate)
    return np.ascontiguousarray(waveform, dtype=np.float32)


def audio_string_kind(text: str) -> str:
    """How [`load_audio`] reads a string, decided from the text alone (no file system access):
    ``"data"`` (data URI), ``"file"`` (file:// URL), ``"url"`` (http/https), ``"base64"`` or ``"path"``.
    (`load_audio` itself reads an existing file of a base64-looking name as a path, when local files are allowed.)
    """
    text = text.strip()
    if text.startswith("data:"):
        return "data"
    scheme = urllib.parse.urlparse(text).scheme.lower()
    if scheme == "file":
        return "file"
    if scheme in ("http", "https"):
        return "url"
    if len(text) >= MIN_BASE64_AUDIO_CHARS and re.fullmatch(r"[A-Za-z0-9+/_\-\s]+={0,2}", text):
        return "base64"
    return "path"


class _AudioReader:
    """Reads one audio source under [`load_audio`]'s rules: URL fetching, local files and the size budget."""

    def __init__(self, allow_url_fetch, max_seconds, allow_local_files):
        self.allow_url_fetch = allow_url_fetch
        self.max_seconds = max_seconds
        self.allow_local_files = allow_local_files

    def check(self, frames, channels, rate):
        """Refuse `frames` x `channels` at `rate` when over budget (before decoding when the header tells)."""
        if self.max_seconds is None:
            return
        if frames > self.max_seconds * rate:
            raise AudioLimitError(f"Audio longer than {self.max_seconds:g} s ({frames / rate:.1f} s) is not accepted.")
        if frames * channels > self.max_seconds * DECODE_BUDGET_SAMPLES_PER_SECOND:
            raise AudioLimitError(
                f"Audio of {channels} channel(s) at {rate} Hz holds more samples than {self.max_seconds:g} s of "
                f"48 kHz stereo; send mono audio at a usual rate (16-48 kHz)."
            )

    def frame_limit(self, channels, rate) -> int:
        return int(min(self.max_seconds * rate, self.max_seconds * DECODE_BUDGET_SAMPLES_PER_SECOND / channels))

    def read(self, source):
        """Any accepted source -> (float32 waveform [C, T], sampling rate)."""
        if isinstance(source, tuple):
            if len(source) != 2:
                raise ValueError("An audio tuple must be (array, sampling_rate).")
            return self.array(source[0], source[1])
        if isinstance(source, dict):
            if "array" in source:
                if source.get("sampling_rate") is None:
                    raise ValueError("An audio dict with an 'array' needs its 'sampling_rate' as well.")
                return self.array(source["array"], source["sampling_rate"])
            if source.get("data") is not None:  # OpenAI style: base64 of an encoded file, never a path
                return self.decode_bytes(_b64decode_audio(source["data"]), "base64 data")
            for key in ("path", "url", "bytes"):
                if source.get(key) is not None:
                    return self.read(source[key])
            raise ValueError(
                f"Unsupported audio dict with keys {sorted(source)}; expected 'array' + 'sampling_rate', 'path', "
                "'url', 'bytes' or 'data'."
            )
        if isinstance(source, (np.ndarray, torch.Tensor)):
            raise ValueError(
                "Audio arrays need an explicit sampling rate: pass (array, sampling_rate) or "
                "{'array': array, 'sampling_rate': sampling_rate}."
            )
        if isinstance(source, (bytes, bytearray, memoryview)):
            return self.decode_bytes(bytes(source), "audio bytes")
        if isinstance(source, os.PathLike):
            return self.decode_file(os.fspath(source))
        if isinstance(source, str):
            return self.read_string(source.strip())
        raise ValueError(f"Unsupported audio source of type {type(source).__name__}.")

    def array(self, array, rate):
        waveform, rate = _array_to_channels_first(array), _check_rate(rate)
        self.check(waveform.shape[1], waveform.shape[0], rate)
        return waveform, rate

    def read_string(self, text):
        kind = audio_string_kind(text)
        if kind == "data":
            header, comma, payload = text.partition(",")
            if not comma or not header.endswith(";base64"):
                raise ValueError("Only base64 data URIs are supported for audio: 'data:audio/<format>;base64,<data>'.")
            return self.decode_bytes(_b64decode_audio(payload), "data URI")
        if kind == "url":
            return self.fetch(text)
        if not self.allow_local_files:
            if kind == "base64":
                return self.decode_bytes(_b64decode_audio(text), "base64 string")
            raise ValueError("Audio must be base64 or a data URI here (file paths are not accepted).")
        if kind == "file":
            parsed = urllib.parse.urlparse(text)
            if parsed.netloc not in ("", "localhost"):
                raise ValueError(f"Only local file:// URLs are supported, got {text!r}.")
            return self.decode_file(urllib.parse.unquote(parsed.path))
        if "\x00" not in text and os.path.exists(text):
            return self.decode_file(text)
        if kind == "base64":
            return self.decode_bytes(_b64decode_audio(text), "base64 string")
        raise ValueError(f"Audio file not found: {_describe(text)} (not an existing path, URL, data URI or base64 string).")

    def fetch(self, url):
        if not self.allow_url_fetch:
            raise ValueError(
                f"Fetching audio from URLs is disabled ({url!r}); pass allow_url_fetch=True to the processor "
                "(constructor or call) to allow it, or download the file yourself."
            )
        limit = None if self.max_seconds is None else int(self.max_seconds * DECODE_BUDGET_SAMPLES_PER_SECOND * 4)
        try:
            with urllib.request.urlopen(url, timeout=URL_FETCH_TIMEOUT_S) as response:
                data = response.read() if limit is None else response.read(limit + 1)
        except OSError as error:
            raise ValueError(f"Could not fetch audio from {url!r}: {error}") from None
        if limit is not None and len(data) > limit:
            raise AudioLimitError(f"The audio at {url!r} is larger than {limit} bytes.")
        return self.decode_bytes(data, f"audio downloaded from {url}")

    def decode_file(self, path):
        if "\x00" in path or not os.path.isfile(path):
            raise ValueError(f"Audio file not found: {_describe(path)}.")
        return self.decode(path, f"file {path!r}")

    def decode_bytes(self, data, description):
        if not data:
            raise ValueError(f"Empty audio: the {description} holds no bytes.")
        try:
            return self.decode_with_soundfile(io.BytesIO(data))
        except _NotSoundfileAudio as soundfile_error:
            with tempfile.TemporaryDirectory() as folder:  # audioread needs a real file
                path = os.path.join(folder, "audio")
                with open(path, "wb") as file:
                    file.write(data)
                return self.decode_with_audioread(path, description, soundfile_error)

    def decode(self, path, description):
        try:
            return self.decode_with_soundfile(path)
        except _NotSoundfileAudio as soundfile_error:  # libsndfile refused it: try librosa (audioread, e.g. ffmpeg)
            return self.decode_with_audioread(path, description, soundfile_error)

    def decode_with_soundfile(self, file):
        """Header first (the budget is checked before any sample is decoded), then the samples."""
        try:
            with sf.SoundFile(file) as sound:
                self.check(sound.frames, sound.channels, sound.samplerate)
                frames = -1 if self.max_seconds is None else self.frame_limit(sound.channels, sound.samplerate) + 1
                data = sound.read(frames, dtype="float32", always_2d=True)  # never past the budget (a lying header)
                return data.T, sound.samplerate
        except (sf.LibsndfileError, RuntimeError, TypeError) as error:
            raise _NotSoundfileAudio(getattr(error, "error_string", None) or type(error).__name__) from None

    def decode_with_audioread(self, path, description, soundfile_error):
        """Formats only librosa/audioread (ffmpeg, ...) read. With a budget, the duration audioread reads from the
        header is checked first (nothing decoded), and decoding stops at `max_seconds` whatever the header said;
        rate and channels are checked once decoded (audioread tells them only by decoding)."""
        duration = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # librosa warns about its audioread fallback being deprecated
                if self.max_seconds is not None:  # the header's duration (audioread's probe; nothing decoded)
                    duration = librosa.get_duration(path=path)
                    if duration > self.max_seconds:
                        raise AudioLimitError(
                            f"Audio longer than {self.max_seconds:g} s ({duration:.1f} s) is not accepted.")
                    duration = self.max_seconds + 1.0  # a header that lied: check() refuses what goes beyond
                samples, rate = librosa.load(path, sr=None, mono=False, dtype=np.float32, duration=duration)
        except AudioLimitError:
            raise
        except Exception as librosa_error:
            raise ValueError(
                f"Could not decode the {description} as audio (soundfile: {soundfile_error}; librosa: "
                f"{type(librosa_error).__name__})."
            ) from None
        return np.atleast_2d(samples), int(rate)


class _NotSoundfileAudio(Exception):
    """soundfile cannot read the data (its message, without object reprs)."""


def _b64decode_audio(payload):
    """Base64 text (optionally a whole data URI) -> bytes."""
    if payload.startswith("data:"):
        payload = payload.partition(",")[2]
    payload = re.sub(r"\s+", "", payload)
    try:
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload)
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"Invalid base64 audio data: {error}") from None


def _array_to_channels_first(array):
    """numpy/torch waveform [T] or [C, T] (float, or integer PCM scaled to [-1, 1)) -> float32 [C, T]."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / float(2 ** (8 * array.dtype.itemsize - 1))
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"Audio arrays must hold float or integer PCM samples, got dtype {array.dtype}.")
    if array.size == 0:
        raise ValueError("Empty audio: the array holds no samples.")
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"Audio arrays must be [T] or [channels, T], got shape {tuple(array.shape)}.")
    if array.shape[0] > array.shape[1]:
        raise ValueError(
            f"Audio array of shape {tuple(array.shape)} looks like [T, channels]; pass [channels, T] (e.g. array.T)."
        )
    return array.astype(np.float32, copy=False)


def _check_rate(rate):
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"The sampling rate must be a positive integer, got {rate!r}.")
    return int(rate)


def _describe(source):
    if isinstance(source, str):
        return repr(source if len(source) <= 80 else source[:77] + "...")
    return f"({type(source).__name__})"


# ---------------------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------------------


class ChromaProcessor(ProcessorMixin):
    r"""Builds Chroma's inputs from chat conversations and a reference voice, and turns its outputs into text/audio.

    Args:
        feature_extractor ([`WhisperFeatureExtractor`]): log-mel features of user audio for the thinker
            (128 mel bins, 16 kHz, hop 160, n_fft 400).
        tokenizer ([`Qwen2Tokenizer`]): the thinker's tokenizer; must know ``<|im_start|>``, ``<|im_end|>``,
            ``<|AUDIO|>``, ``<|audio_bos|>``, ``<|audio_eos|>`` and have a pad token.
        chat_template (`str`, *optional*): Jinja chat template; defaults to [`CHAT_TEMPLATE`] (ChatML, Qwen2.5-Omni).
        codec_sampling_rate (`int`, defaults to 24000): rate of the reference voices and of generated audio (Mimi).
        allow_url_fetch (`bool`, defaults to `False`): allow ``http(s)://`` audio sources. Never saved with the
            processor; can also be given per call.
    """

    _auto_class = "AutoProcessor"  # save_pretrained writes auto_map and copies this file next to the configs

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        chat_template=None,
        codec_sampling_rate=CODEC_SAMPLING_RATE,
        allow_url_fetch=False,
    ):
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        self.codec_sampling_rate = codec_sampling_rate
        self._allow_url_fetch = allow_url_fetch  # private name: to_dict() does not persist it
        for token in (IM_START_TOKEN, IM_END_TOKEN, AUDIO_TOKEN, AUDIO_BOS_TOKEN, AUDIO_EOS_TOKEN):
            if token not in self.tokenizer.get_vocab():
                raise ValueError(f"The tokenizer does not know the special token {token}.")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer needs a pad token (Qwen2 uses <|endoftext|>).")
        self.audio_token = AUDIO_TOKEN
        self.audio_token_id = self.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)

    @property
    def model_input_names(self):
        return [
            "thinker_input_ids",
            "thinker_attention_mask",
            "thinker_input_features",
            "thinker_feature_attention_mask",
            "input_ids",
            "attention_mask",
            "input_values",
            "input_values_cutoffs",
        ]

    def __call__(
        self,
        conversations,
        prompt_audio=None,
        prompt_text=None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        allow_url_fetch: bool | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        r"""Conversations (+ reference voice) -> model inputs (see the module docstring for every key and shape).

        Args:
            conversations: one conversation (a list of ``{"role", "content"}`` messages) or a batch (a list of
                conversations). ``content`` is a string or a list of items ``{"type": "text", "text": str}``,
                ``{"type": "audio", "audio": source}`` (``"path"``/``"url"`` keys also work; a
                ``"sampling_rate"`` key gives the rate of an array source), or OpenAI's
                ``{"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}``.
            prompt_audio: reference voice, one source per conversation (a list; a single source for one
                conversation). Sources as in [`load_audio`]; resampled to `codec_sampling_rate`.
            prompt_text: transcript of each reference voice (a list of strings; a string for one conversation).
                Give both `prompt_audio` and `prompt_text` or neither.
            add_generation_prompt (`bool`, defaults to `True`): open an assistant turn at the end.
            tokenize (`bool`): accepted for compatibility with the official call; ids are always returned.
            allow_url_fetch (`bool`, *optional*): overrides the constructor's setting for this call.
            return_tensors (`str`, defaults to `"pt"`): `"pt"` or `"np"`.

        Returns:
            [`BatchFeature`] with ``thinker_input_ids`` / ``thinker_attention_mask`` [B, S] (left padded),
            ``thinker_input_features`` [A, 128, M] / ``thinker_feature_attention_mask`` [A, M] when there is user
            audio (A clips in order of appearance, padded on the right to the longest clip), and ``input_ids`` /
            ``attention_mask`` [B, P] (left padded), ``input_values`` [B, 1, T] (right padded) and
            ``input_values_cutoffs`` [B] when a reference voice is given.
        """
        allow_url_fetch = self._allow_url_fetch if allow_url_fetch is None else allow_url_fetch
        conversations = _as_batch_of_conversations(conversations)
        batch_size = len(conversations)

        prompts, clips = [], []
        for conversation in conversations:
            sources = _audio_sources(conversation)
            prompts.append(self._render(conversation, add_generation_prompt, len(sources)))
            clips += [self._load_user_audio(source, allow_url_fetch) for source in sources]

        data = {}
        audio_tokens = []
        if clips:
            features, feature_mask = self._extract_features(clips)
            data["thinker_input_features"] = features
            data["thinker_feature_attention_mask"] = feature_mask
            audio_tokens = [num_audio_tokens(int(frames)) for frames in feature_mask.sum(-1)]
        prompts = self._expand_audio_tokens(prompts, audio_tokens)
        thinker = self.tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left")
        data["thinker_input_ids"] = np.asarray(thinker["input_ids"], dtype=np.int64)
        data["thinker_attention_mask"] = np.asarray(thinker["attention_mask"], dtype=np.int64)

        reference = self._reference_inputs(prompt_audio, prompt_text, batch_size, allow_url_fetch)
        data.update(reference)
        ordered = {name: data[name] for name in self.model_input_names if name in data}
        return BatchFeature(data=ordered, tensor_type=return_tensors)

    def apply_chat_template(
        self,
        conversation,
        chat_template=None,
        add_generation_prompt=False,
        tokenize=False,
        return_dict=False,
        **kwargs,
    ):
        """Render conversation(s) to text with the chat template (one ``<|AUDIO|>`` per audio item, not expanded).

        With `tokenize=True` this is the processor call itself: `kwargs` (``prompt_audio``, ``prompt_text``, ...) go
        to [`__call__`], and the whole [`BatchFeature`] is returned with `return_dict=True`, else
        ``thinker_input_ids``.
        """
        if not tokenize:
            return super().apply_chat_template(
                conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt, **kwargs
            )
        if chat_template is not None and chat_template != self.chat_template:
            raise ValueError("A custom chat_template is only supported with tokenize=False.")
        inputs = self(conversation, add_generation_prompt=add_generation_prompt, **kwargs)
        return inputs if return_dict else inputs["thinker_input_ids"]

    # ---- thinker side ----

    def _render(self, conversation, add_generation_prompt, num_clips):
        prompt = self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        if prompt.count(AUDIO_TOKEN) != num_clips:
            raise ValueError(
                f"The rendered conversation holds {prompt.count(AUDIO_TOKEN)} {AUDIO_TOKEN} placeholders for "
                f"{num_clips} audio items (is {AUDIO_TOKEN} written in a text item, or does the chat template drop "
                "audio items?)."
            )
        return prompt

    def _load_user_audio(self, source, allow_url_fetch):
        rate = self.feature_extractor.sampling_rate
        # refused before decoding when longer than the feature extractor accepts (or far too large to decode)
        waveform = load_audio(source, rate, allow_url_fetch, max_seconds=self.feature_extractor.n_samples / rate)
        if len(waveform) > self.feature_extractor.n_samples:
            raise ValueError(
                f"An audio clip lasts {len(waveform) / rate:.1f} s; the feature extractor accepts at most "
                f"{self.feature_extractor.n_samples / rate:.0f} s (its chunk_length)."
            )
        if num_audio_tokens(math.ceil(len(waveform) / self.feature_extractor.hop_length)) < 1:
            raise ValueError(
                f"An audio clip of {len(waveform)} samples at {rate} Hz is too short for one audio token."
            )
        return waveform

    def _extract_features(self, clips):
        """16 kHz waveforms -> log-mel [A, n_mels, M] float32 and valid-frame mask [A, M] int64.

        The clips are padded only to the longest one (not to 30 s / 300 s), with enough extra zeros (n_fft) that
        every frame touching a signal is computed exactly as with the reference's fixed-length padding; the M valid
        frames of the longest clip are kept. The thinker reads only valid frames, so its outputs are unchanged.
        """
        extractor = self.feature_extractor
        hop = extractor.hop_length
        longest = max(len(clip) for clip in clips)
        num_frames = math.ceil(longest / hop)
        padded_length = math.ceil((longest + extractor.n_fft) / hop) * hop
        features = extractor(
            clips,
            sampling_rate=extractor.sampling_rate,
            padding="max_length",
            max_length=padded_length,
            truncation=False,
            return_attention_mask=True,
            return_tensors="np",
        )
        input_features = np.asarray(features["input_features"][:, :, :num_frames], dtype=np.float32)
        frame_mask = np.asarray(features["attention_mask"][:, :num_frames], dtype=np.int64)
        return input_features, frame_mask

    @staticmethod
    def _expand_audio_tokens(prompts, audio_tokens):
        """Replace the k-th <|AUDIO|> of the batch by `audio_tokens[k]` copies."""
        counts = iter(audio_tokens)
        expanded = []
        for prompt in prompts:
            pieces = prompt.split(AUDIO_TOKEN)
            text = pieces[0]
            for piece in pieces[1:]:
                text += AUDIO_TOKEN * next(counts) + piece
            expanded.append(text)
        return expanded

    # ---- reference voice ----

    def _reference_inputs(self, prompt_audio, prompt_text, batch_size, allow_url_fetch):
        if prompt_audio is None and prompt_text is None:
            return {}
        if prompt_audio is None:
            raise ValueError("prompt_text was given without prompt_audio: give both (a reference voice) or neither.")
        if prompt_text is None:
            raise ValueError("prompt_audio was given without prompt_text: give both (a reference voice) or neither.")
        if isinstance(prompt_text, str):
            prompt_text = [prompt_text]
        if not isinstance(prompt_audio, list):
            prompt_audio = [prompt_audio]
        if not (len(prompt_audio) == len(prompt_text) == batch_size):
            raise ValueError(
                f"Got {batch_size} conversation(s), {len(prompt_audio)} prompt_audio and {len(prompt_text)} "
                "prompt_text: give one reference voice and one transcript per conversation."
            )
        for index, text in enumerate(prompt_text):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"prompt_text[{index}] must be a non-empty string (the reference transcript).")

        text = self.tokenizer(prompt_text, add_special_tokens=False, padding=True, padding_side="left")
        voices = [load_audio(source, self.codec_sampling_rate, allow_url_fetch) for source in prompt_audio]
        cutoffs = np.asarray([len(voice) for voice in voices], dtype=np.int64)
        input_values = np.zeros((batch_size, 1, int(cutoffs.max())), dtype=np.float32)
        for row, voice in enumerate(voices):
            input_values[row, 0, : len(voice)] = voice
        return {
            "input_ids": np.asarray(text["input_ids"], dtype=np.int64),
            "attention_mask": np.asarray(text["attention_mask"], dtype=np.int64),
            "input_values": input_values,
            "input_values_cutoffs": cutoffs,
        }

    # ---- outputs ----

    def batch_decode(self, sequences, skip_special_tokens: bool = True, codec_model=None, audio_lengths=None,
                     **kwargs):
        """Decode a batch of generated outputs: text ids or audio codes (as transformers' CSM and Dia processors do).

        Args:
            sequences: thinker ids [B, N] (``out.text_sequences``) -> B strings; or audio codes [B, T, K] (3-D,
                ``out.sequences``) -> B float32 waveforms [n] (torch tensors on the CPU) at `codec_sampling_rate`.
            skip_special_tokens (`bool`, defaults to `True`): text only.
            codec_model: audio only, required: the model's Mimi (``model.codec_model``), which decodes the codes.
            audio_lengths: audio only: valid frames of every row (``out.audio_lengths``); rows are cut to them.
        """
        if _is_audio_codes(sequences):
            return self._decode_codes(sequences, codec_model, audio_lengths)
        if codec_model is not None or audio_lengths is not None:
            raise ValueError("codec_model/audio_lengths are for audio codes [B, T, K]; got text ids.")
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = True, codec_model=None, audio_lengths=None, **kwargs):
        """Decode one generated output: thinker ids [N] -> string; audio codes [1, T, K] -> one waveform [n]
        (arguments as in [`batch_decode`])."""
        if _is_audio_codes(token_ids):
            if token_ids.shape[0] != 1:
                raise ValueError(f"decode takes one row of audio codes [1, T, K], got {tuple(token_ids.shape)}; "
                                 "use batch_decode for several.")
            return self._decode_codes(token_ids, codec_model, audio_lengths)[0]
        if codec_model is not None or audio_lengths is not None:
            raise ValueError("codec_model/audio_lengths are for audio codes [1, T, K]; got text ids.")
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @torch.no_grad()
    def _decode_codes(self, codes, codec_model, audio_lengths) -> list[torch.Tensor]:
        """Audio codes [B, T, K] -> B float32 CPU waveforms, each cut to its valid frames."""
        if codec_model is None:
            raise ValueError("Decoding audio codes needs the codec: pass codec_model=model.codec_model.")
        codes = torch.as_tensor(codes)
        batch, frames, _ = codes.shape
        lengths = [frames] * batch if audio_lengths is None else [int(n) for n in torch.as_tensor(audio_lengths)]
        if len(lengths) != batch or not all(0 <= n <= frames for n in lengths):
            raise ValueError(f"audio_lengths {lengths} do not fit codes of shape {tuple(codes.shape)}.")
        samples_per_frame = round(codec_model.config.sampling_rate / codec_model.config.frame_rate)  # 1920
        if frames == 0:
            return [torch.zeros(0) for _ in range(batch)]
        # Mimi decodes real codes only: the EOS/pad values of the audio vocabulary (>= codebook_size) are clamped.
        real_codes = codes.clamp(0, codec_model.config.codebook_size - 1).to(codec_model.device)
        audio = codec_model.decode(real_codes.transpose(1, 2)).audio_values  # [B, 1, T * samples_per_frame]
        return [audio[row, 0, : n * samples_per_frame].float().cpu() for row, n in enumerate(lengths)]

    def save_audio(self, audio, saving_path, subtype: str = "PCM_16"):
        """Write waveform(s) to audio file(s) at `codec_sampling_rate`, as transformers' CSM/Dia processors do.

        Args:
            audio: one waveform ([n], [1, n]; tensor or array) or a list of them (what `batch_decode` returns).
            saving_path: one path, or a list with one path per waveform. The format follows the file name.
            subtype (`str`, defaults to ``"PCM_16"``): soundfile subtype. Integer subtypes clip to [-1, 1]; when
                samples clip, a warning says how many (scale the audio, e.g. to a peak of 0.95, to avoid it).
        """
        waveforms = _audio_rows(audio if isinstance(audio, (list, tuple)) else [audio])
        paths = [saving_path] if isinstance(saving_path, (str, os.PathLike)) else list(saving_path)
        if len(paths) != len(waveforms):
            raise ValueError(f"Got {len(waveforms)} waveform(s) and {len(paths)} path(s): give one path per waveform.")
        for waveform, path in zip(waveforms, paths):
            if subtype.startswith("PCM"):
                clipped = int(np.count_nonzero(np.abs(waveform) > 1.0))
                if clipped:
                    logger.warning(f"{path}: {clipped} of {len(waveform)} samples ({100 * clipped / len(waveform):.1f} "
                                   "%) exceed [-1, 1] and are clipped.")
                waveform = np.clip(waveform, -1.0, 1.0)
            sf.write(path, waveform, self.codec_sampling_rate, subtype=subtype)

    def audio_to_numpy(self, audio_values, lengths=None) -> list[np.ndarray]:
        """Generated audio -> one float32 waveform [n] per row, at `codec_sampling_rate` (24 kHz).

        Args:
            audio_values: a tensor/array [B, 1, T], [B, T] or [T], or a list of per-row waveforms (each [n], [1, n]
                or [1, 1, n], e.g. what ``codec_model.decode(...).audio_values`` gives per sample).
            lengths: valid samples of every row (sequence or tensor [B]); rows are cut to them. Default: all.
        """
        rows = _audio_rows(audio_values)
        if lengths is None:
            return rows
        lengths = [int(length) for length in (lengths.tolist() if hasattr(lengths, "tolist") else lengths)]
        if len(lengths) != len(rows):
            raise ValueError(f"Got {len(lengths)} lengths for {len(rows)} audio rows.")
        for row, length in zip(rows, lengths):
            if not 0 <= length <= len(row):
                raise ValueError(f"Length {length} is outside the audio row of {len(row)} samples.")
        return [row[:length] for row, length in zip(rows, lengths)]

    def audio_to_wav_bytes(self, audio_values, lengths=None, subtype: str = "PCM_16") -> list[bytes]:
        """Generated audio -> one in-memory WAV file (`bytes`) per row at `codec_sampling_rate`.

        Arguments as in [`audio_to_numpy`]; `subtype` is a soundfile WAV subtype (``"PCM_16"``, ``"FLOAT"``, ...).
        Integer subtypes clip samples to [-1, 1].
        """
        files = []
        for waveform in self.audio_to_numpy(audio_values, lengths):
            if subtype.startswith("PCM"):
                waveform = np.clip(waveform, -1.0, 1.0)
            buffer = io.BytesIO()
            sf.write(buffer, waveform, self.codec_sampling_rate, format="WAV", subtype=subtype)
            files.append(buffer.getvalue())
        return files


# ---------------------------------------------------------------------------------------------------------------------
# Input validation helpers
# ---------------------------------------------------------------------------------------------------------------------


def _as_batch_of_conversations(conversations):
    """One conversation (list of message dicts) or a batch (list of them) -> list of conversations."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("conversations must be a non-empty list of messages or a non-empty list of conversations.")
    if all(isinstance(message, dict) for message in conversations):
        conversations = [conversations]
    for conversation in conversations:
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("Every conversation must be a non-empty list of messages.")
        for message in conversation:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"Every message must be a dict with 'role' and 'content', got {message!r:.80}.")
    return [list(conversation) for conversation in conversations]


def _audio_sources(conversation):
    """Validate the content items of a conversation and return its audio sources, in order."""
    sources = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"Message content must be a string or a list of items, got {type(content).__name__}.")
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise ValueError("A text item needs a string 'text'.")
            elif kind == "audio":
                sources.append(_audio_item_source(item))
            elif kind == "input_audio":
                payload = item.get("input_audio")
                if not isinstance(payload, dict) or not isinstance(payload.get("data"), str):
                    raise ValueError("An input_audio item needs {'input_audio': {'data': <base64>, 'format': ...}}.")
                sources.append({"data": payload["data"]})
            else:
                raise ValueError(
                    f"Unsupported content item type {kind!r}: Chroma accepts 'text', 'audio' and 'input_audio' items."
                )
    return sources


def _audio_item_source(item):
    keys = [key for key in ("audio", "path", "url") if item.get(key) is not None]
    if len(keys) != 1:
        raise ValueError("An audio item needs exactly one of 'audio', 'path' or 'url'.")
    source = item[keys[0]]
    if item.get("sampling_rate") is not None and isinstance(source, (np.ndarray, torch.Tensor)):
        source = (source, item["sampling_rate"])
    return source


def _audio_rows(audio_values):
    if isinstance(audio_values, (list, tuple)):
        rows = [_to_numpy(row) for row in audio_values]
        for row in rows:
            if row.squeeze().ndim > 1:
                raise ValueError(f"Each audio row must be mono ([n], [1, n] or [1, 1, n]), got shape {row.shape}.")
        return [np.ascontiguousarray(row.reshape(-1)) for row in rows]
    array = _to_numpy(audio_values)
    if array.ndim == 1:
        return [array]
    if array.ndim == 3:
        if array.shape[1] != 1:
            raise ValueError(f"Expected mono audio [B, 1, T], got shape {array.shape}.")
        array = array[:, 0]
    if array.ndim != 2:
        raise ValueError(f"Expected audio [B, 1, T], [B, T] or [T], got shape {array.shape}.")
    return [np.ascontiguousarray(row) for row in array]


def _is_audio_codes(values) -> bool:
    """Audio codes are 3-D [B, T, K]; text ids are 1-D or 2-D (tensors, arrays or nested lists)."""
    return getattr(values, "ndim", None) == 3


def _to_numpy(values):
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float32).numpy()
    return np.asarray(values, dtype=np.float32)


__all__ = ["ChromaProcessor", "load_audio", "num_audio_tokens", "CHAT_TEMPLATE", "AudioLimitError", "audio_string_kind"]
