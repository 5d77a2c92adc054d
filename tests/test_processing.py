# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Tests of `ChromaProcessor` (processing_chroma.py) and the tiny tokenizer/processor (tiny_chroma.py).

Everything runs on CPU without downloads: audio is synthesised here (sine tones written with soundfile into
tmp_path), the tokenizer is the offline tiny one, and the thinker used to check feature padding is a seeded random
tiny Qwen2.5-Omni thinker built from `ChromaConfig.tiny()`.
"""

import ast
import base64
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from openchroma import processing_chroma
from openchroma.configuration_chroma import TINY_SPECIAL_TOKENS_REAL_IDS, ChromaConfig
from openchroma.processing_chroma import CHAT_TEMPLATE, ChromaProcessor, load_audio, num_audio_tokens
from openchroma.testing import build_tiny_processor, build_tiny_tokenizer, save_tiny_processor


REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "reference_tiny"
THINKER_KEYS = ["thinker_input_ids", "thinker_attention_mask"]
FEATURE_KEYS = ["thinker_input_features", "thinker_feature_attention_mask"]
REFERENCE_KEYS = ["input_ids", "attention_mask", "input_values", "input_values_cutoffs"]


def sine(seconds, sampling_rate, frequency=440.0, amplitude=0.3):
    t = np.arange(int(round(seconds * sampling_rate))) / sampling_rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def audio_message(source, text=None, role="user"):
    content = [{"type": "audio", "audio": source}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def wav_file(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, sine(1.0, 16000), 16000, subtype="FLOAT")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Tiny tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_special_ids_match_tiny_config(tokenizer):
    """The tiny model's embedding rows 1000..1023 are the special block: a shifted id would feed wrong embeddings."""
    for token, real_id in TINY_SPECIAL_TOKENS_REAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == real_id - 151643 + 1000, token
    thinker = ChromaConfig.tiny().thinker_config
    assert tokenizer.pad_token_id == thinker.pad_token_id == 1000
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == thinker.bos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == thinker.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|AUDIO|>") == thinker.audio_token_index
    assert len(tokenizer) < thinker.text_config.vocab_size == 1100
    # The gaps of the special block hold Qwen's other added tokens, at their shifted ids.
    assert tokenizer.convert_tokens_to_ids("<|box_end|>") == 1006
    assert tokenizer.convert_tokens_to_ids("<|file_sep|>") == 1021


def test_tiny_tokenizer_ordinary_text(tokenizer):
    text = "Hello, how are you today? The robot sings 12345 songs — naïve café!"
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < 1000
    assert tokenizer.decode(ids) == text
    assert tokenizer("<|im_start|>user\n")["input_ids"][0] == 1001  # special strings are single tokens


def test_tiny_tokenizer_is_deterministic(tokenizer):
    assert build_tiny_tokenizer().get_vocab() == tokenizer.get_vocab()


# ---------------------------------------------------------------------------------------------------------------------
# Chat template and the main call
# ---------------------------------------------------------------------------------------------------------------------


def test_chat_template_rendering(processor):
    conversation = [audio_message((sine(1.0, 16000), 16000), "What is this?")]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == expected
    rendered = processor.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert rendered == expected
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = processor.apply_chat_template(with_system, tokenize=False)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert processor.chat_template == CHAT_TEMPLATE


def test_apply_chat_template_tokenize_is_the_processor_call(processor, wav_file):
    conversation = [audio_message(wav_file, "Hi")]
    direct = processor(conversation, prompt_audio=wav_file, prompt_text="Hello.")
    via_template = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        prompt_audio=wav_file,
        prompt_text="Hello.",
    )
    assert list(via_template.keys()) == list(direct.keys())
    for key in direct:
        torch.testing.assert_close(via_template[key], direct[key])
    ids = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    torch.testing.assert_close(ids, direct["thinker_input_ids"])


def test_single_conversation_keys_shapes_dtypes(processor):
    wave = sine(1.0, 16000)
    conversation = [audio_message((wave, 16000), "What is this?")]
    out = processor(
        conversation,
        add_generation_prompt=True,
        tokenize=False,
        prompt_audio=[(sine(0.5, 24000), 24000)],
        prompt_text=["Hello there."],
    )
    assert list(out.keys()) == THINKER_KEYS + FEATURE_KEYS + REFERENCE_KEYS
    assert out["thinker_input_ids"].dtype == out["thinker_attention_mask"].dtype == torch.int64
    assert out["thinker_input_features"].dtype == torch.float32
    assert out["thinker_feature_attention_mask"].dtype == torch.int64
    assert out["input_values"].dtype == torch.float32 and out["input_values_cutoffs"].dtype == torch.int64
    assert out["thinker_input_features"].shape == (1, 128, 100)  # 1 s = 100 mel frames, no padding to 30 s
    assert out["thinker_feature_attention_mask"].sum() == 100
    assert (out["thinker_input_ids"] == processor.audio_token_id).sum() == 25 == num_audio_tokens(100)
    assert out["input_values"].shape == (1, 1, 12000) and out["input_values_cutoffs"].tolist() == [12000]

    # The ids are the rendered template with <|AUDIO|> repeated 25 times; the transcript has no special tokens.
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    expected = processor.tokenizer(text.replace("<|AUDIO|>", "<|AUDIO|>" * 25))["input_ids"]
    assert out["thinker_input_ids"][0].tolist() == expected
    assert out["input_ids"][0].tolist() == processor.tokenizer("Hello there.", add_special_tokens=False)["input_ids"]
    assert out["attention_mask"].all()


def test_single_conversation_accepts_unwrapped_reference(processor, wav_file):
    wrapped = processor([{"role": "user", "content": "Hi"}], prompt_audio=[wav_file], prompt_text=["Hello."])
    unwrapped = processor([{"role": "user", "content": "Hi"}], prompt_audio=wav_file, prompt_text="Hello.")
    for key in wrapped:
        torch.testing.assert_close(wrapped[key], unwrapped[key])


def test_text_only_and_no_reference(processor):
    out = processor([{"role": "user", "content": [{"type": "text", "text": "Tell me a joke."}]}])
    assert list(out.keys()) == THINKER_KEYS
    assert processor.decode(out["thinker_input_ids"][0]).endswith("Tell me a joke.\nassistant\n")
    no_prompt = processor([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert not processor.tokenizer.decode(no_prompt["thinker_input_ids"][0]).endswith("<|im_start|>assistant\n")


def test_features_match_reference_fixture(processor):
    """The official pipeline's features (WhisperFeatureExtractor, padded to 3000 frames) for the fixture clip."""
    wave = np.load(FIXTURE / "aux_waveforms.npz")["wave16k"][0]
    reference = np.load(FIXTURE / "inputs.npz")
    out = processor([audio_message((wave, 16000))], return_tensors="np")
    valid = int(reference["thinker_feature_attention_mask"].sum())
    assert out["thinker_input_features"].shape[-1] == valid
    # torch's CPU FFT takes processor-specific paths: the fixture's machine (AMD EPYC) and an Intel Xeon differ by up
    # to 1.5e-5 on these log-mel values (measured); a real feature bug (wrong window, hop, padding, mel scale) moves
    # them by 1e-2 or more.
    np.testing.assert_allclose(
        out["thinker_input_features"], reference["thinker_input_features"][:, :, :valid], atol=5e-5
    )
    np.testing.assert_array_equal(
        out["thinker_feature_attention_mask"], reference["thinker_feature_attention_mask"][:, :valid]
    )
    assert (out["thinker_input_ids"] == 1003).sum() == (reference["thinker_input_ids"] == 1003).sum()


def test_longest_padding_keeps_every_valid_frame(processor):
    """Padding to the longest clip gives the same valid frames and mask as padding every clip to 30 s."""
    rng = np.random.default_rng(0)
    clips = [rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in (16000, 40123, 999, 16161)]
    out = processor([[audio_message((clip, 16000))] for clip in clips], return_tensors="np")
    frames = out["thinker_input_features"].shape[-1]
    assert frames == int(np.ceil(40123 / 160))
    reference = processor.feature_extractor(
        clips,
        sampling_rate=16000,
        padding="max_length",
        max_length=480000,
        return_attention_mask=True,
        return_tensors="np",
    )
    np.testing.assert_array_equal(out["thinker_feature_attention_mask"], reference["attention_mask"][:, :frames])
    assert reference["attention_mask"][:, frames:].sum() == 0
    mask = out["thinker_feature_attention_mask"].astype(bool)
    np.testing.assert_allclose(
        out["thinker_input_features"].transpose(0, 2, 1)[mask],
        reference["input_features"][:, :, :frames].transpose(0, 2, 1)[mask],
        atol=1e-6,
    )


@pytest.fixture(scope="module")
def tiny_thinker():
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2_5OmniThinkerForConditionalGeneration(ChromaConfig.tiny().thinker_config).eval()


def _thinker_last_logits(thinker, inputs, features, feature_mask):
    with torch.no_grad():
        return thinker(
            input_ids=inputs["thinker_input_ids"],
            attention_mask=inputs["thinker_attention_mask"],
            input_features=features,
            feature_attention_mask=feature_mask,
        ).logits[:, -1]


def _two_conversations():
    rng = np.random.default_rng(1)
    first = (sine(1.0, 16000, 300) + 0.01 * rng.standard_normal(16000)).astype(np.float32)
    second = (sine(2.5, 16000, 500) + 0.01 * rng.standard_normal(40000)).astype(np.float32)
    return [
        [audio_message((first, 16000), "Hi")],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Listen:"},
                    {"type": "audio", "audio": (second, 16000)},
                ],
            }
        ],
    ], [first, second]


def test_thinker_logits_unchanged_by_feature_padding(processor, tiny_thinker):
    """Our features padded to the longest clip vs the reference's max_length (3000 frames) padding."""
    conversations, clips = _two_conversations()
    inputs = processor(conversations)
    reference = processor.feature_extractor(
        clips,
        sampling_rate=16000,
        padding="max_length",
        max_length=480000,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert reference["input_features"].shape[-1] == 3000 > inputs["thinker_input_features"].shape[-1]
    ours = _thinker_last_logits(
        tiny_thinker, inputs, inputs["thinker_input_features"], inputs["thinker_feature_attention_mask"]
    )
    theirs = _thinker_last_logits(
        tiny_thinker, inputs, reference["input_features"], reference["attention_mask"].long()
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_thinker_batched_rows_match_solo(processor, tiny_thinker):
    """Left padding makes a batched row's last-position logits equal to the same conversation run alone."""
    conversations, _ = _two_conversations()
    batch = processor(conversations)
    batched = _thinker_last_logits(
        tiny_thinker, batch, batch["thinker_input_features"], batch["thinker_feature_attention_mask"]
    )
    for row, conversation in enumerate(conversations):
        solo = processor(conversation)
        alone = _thinker_last_logits(
            tiny_thinker, solo, solo["thinker_input_features"], solo["thinker_feature_attention_mask"]
        )
        torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=0)


def test_batch_padding_sides(processor):
    short_voice, long_voice = sine(0.5, 24000), sine(0.8, 24000, 220)
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [audio_message((sine(1.0, 16000), 16000), "A much longer question about this sound, please?")],
    ]
    out = processor(
        conversations,
        prompt_audio=[(long_voice, 24000), (short_voice, 24000)],
        prompt_text=["A long reference transcript here.", "Short."],
    )
    pad = processor.tokenizer.pad_token_id
    mask = out["thinker_attention_mask"]
    assert mask[1].all() and not mask[0].all()
    padding = int((mask[0] == 0).sum())
    assert mask[0, :padding].eq(0).all() and mask[0, padding:].eq(1).all()  # left padding
    assert out["thinker_input_ids"][0, :padding].eq(pad).all()
    solo = processor(conversations[0])
    assert out["thinker_input_ids"][0, padding:].tolist() == solo["thinker_input_ids"][0].tolist()
    assert out["thinker_input_features"].shape[0] == 1  # one row per audio clip, not per conversation

    text_mask = out["attention_mask"]
    assert text_mask[0].all() and text_mask[1, 0] == 0 and text_mask[1, -1] == 1  # left padding
    assert out["input_ids"][1, : int((text_mask[1] == 0).sum())].eq(pad).all()

    assert out["input_values"].shape == (2, 1, len(long_voice))
    assert out["input_values_cutoffs"].tolist() == [len(long_voice), len(short_voice)]
    np.testing.assert_array_equal(out["input_values"][1, 0, len(short_voice) :].numpy(), 0.0)  # right padding
    np.testing.assert_allclose(out["input_values"][1, 0, : len(short_voice)].numpy(), short_voice)


def test_several_clips_in_order(processor):
    clips = [sine(1.0, 16000), sine(0.5, 16000, 880), sine(2.0, 16000, 220)]
    conversations = [
        [
            audio_message((clips[0], 16000), "first"),
            {"role": "assistant", "content": "ok"},
            audio_message((clips[1], 16000), "second"),
        ],
        [{"role": "user", "content": "no audio here"}],
        [audio_message((clips[2], 16000))],
    ]
    out = processor(conversations, return_tensors="np")
    assert out["thinker_input_features"].shape == (3, 128, 200)
    assert out["thinker_feature_attention_mask"].sum(-1).tolist() == [100, 50, 200]
    audio_id = processor.audio_token_id
    counts = (out["thinker_input_ids"] == audio_id).sum(-1).tolist()
    assert counts == [num_audio_tokens(100) + num_audio_tokens(50), 0, num_audio_tokens(200)] == [37, 0, 50]


# ---------------------------------------------------------------------------------------------------------------------
# Audio sources
# ---------------------------------------------------------------------------------------------------------------------


def _encoded(wave, sampling_rate, fmt, subtype=None):
    buffer = io.BytesIO()
    sf.write(buffer, wave, sampling_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt, subtype, exact",
    [
        ("WAV", "FLOAT", True),
        ("WAV", "PCM_16", False),
        ("FLAC", "PCM_16", False),
        ("OGG", "VORBIS", False),
        ("MP3", None, False),
    ],
)
def test_file_formats(tmp_path, fmt, subtype, exact):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    wave = sine(1.0, 22050)
    path = tmp_path / f"tone.{fmt.lower()}"
    try:
        sf.write(path, wave, 22050, format=fmt, subtype=subtype)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        pytest.skip(f"this libsndfile cannot write {fmt}: {error}")
    loaded = load_audio(str(path), 16000)
    expected = librosa.resample(wave, orig_sr=22050, target_sr=16000)
    assert loaded.dtype == np.float32 and loaded.ndim == 1
    if exact:
        np.testing.assert_allclose(loaded, expected, atol=1e-6)
    elif fmt in ("WAV", "FLAC"):
        np.testing.assert_allclose(loaded, expected, atol=1e-3)
    else:  # lossy codecs add encoder delay/padding: check duration and loudness only
        assert abs(len(loaded) - 16000) < 0.1 * 16000
        assert abs(np.sqrt(np.mean(loaded**2)) - 0.3 / np.sqrt(2)) < 0.05


def test_source_kinds_agree(processor, wav_file):
    wave = sine(1.0, 16000)
    data = wav_file.read_bytes()
    b64 = base64.b64encode(data).decode()
    sources = {
        "path str": str(wav_file),
        "Path": wav_file,
        "file url": wav_file.as_uri(),
        "data uri": f"data:audio/wav;base64,{b64}",
        "raw base64": b64,
        "bytes": data,
        "tuple numpy": (wave, 16000),
        "tuple torch": (torch.from_numpy(wave), 16000),
        "dict": {"array": wave, "sampling_rate": 16000},
        "channels first": (np.stack([wave, wave]), 16000),
    }
    for name, source in sources.items():
        np.testing.assert_allclose(load_audio(source, 16000), wave, atol=1e-7, err_msg=name)

    items = [
        {"type": "audio", "audio": str(wav_file)},
        {"type": "audio", "path": str(wav_file)},
        {"type": "audio", "url": wav_file.as_uri()},
        {"type": "audio", "audio": wave, "sampling_rate": 16000},
        {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
    ]
    outputs = [processor([{"role": "user", "content": [item]}]) for item in items]
    for out in outputs[1:]:
        torch.testing.assert_close(out["thinker_input_features"], outputs[0]["thinker_input_features"])
        torch.testing.assert_close(out["thinker_input_ids"], outputs[0]["thinker_input_ids"])


def test_resampling_mono_and_pcm(processor):
    left, right = sine(1.0, 48000, 440, 0.4), sine(1.0, 48000, 660, 0.2)
    stereo = torch.from_numpy(np.stack([left, right]))  # [C, T]
    expected = librosa.resample((left + right) / 2, orig_sr=48000, target_sr=24000)
    out = processor([{"role": "user", "content": "Hi"}], prompt_audio=(stereo, 48000), prompt_text="Hello.")
    assert out["input_values_cutoffs"].tolist() == [24000]
    np.testing.assert_allclose(out["input_values"][0, 0].numpy(), expected, atol=1e-5)
    pcm = (left * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio((pcm, 48000), 48000), left, atol=1e-4)
    bf16 = load_audio((torch.from_numpy(left).to(torch.bfloat16), 48000), 48000)
    assert bf16.dtype == np.float32 and np.abs(bf16 - left).max() < 1e-2


def test_url_fetch_when_enabled(tmp_path, wav_file):
    """http(s) sources work only when allowed (served here from localhost; nothing leaves the machine)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(wav_file.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{wav_file.name}"
        conversation = [audio_message(url)]
        with pytest.raises(ValueError, match="Fetching audio from URLs is disabled"):
            build_tiny_processor()(conversation)
        by_call = build_tiny_processor()(conversation, allow_url_fetch=True)
        by_constructor = build_tiny_processor(allow_url_fetch=True)(conversation)
        torch.testing.assert_close(by_call["thinker_input_features"], by_constructor["thinker_input_features"])
        np.testing.assert_allclose(load_audio(url, 16000, allow_url_fetch=True), sine(1.0, 16000), atol=1e-7)
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


def test_reference_voice_errors(processor, wav_file):
    one = [{"role": "user", "content": "Hi"}]
    two = [one, one]
    with pytest.raises(ValueError, match="prompt_audio was given without prompt_text"):
        processor(one, prompt_audio=[wav_file])
    with pytest.raises(ValueError, match="prompt_text was given without prompt_audio"):
        processor(one, prompt_text=["Hello."])
    with pytest.raises(ValueError, match="Got 2 conversation\\(s\\), 1 prompt_audio and 1 prompt_text"):
        processor(two, prompt_audio=[wav_file], prompt_text=["Hello."])
    with pytest.raises(ValueError, match="Got 2 conversation\\(s\\), 2 prompt_audio and 1 prompt_text"):
        processor(two, prompt_audio=[wav_file, wav_file], prompt_text=["Hello."])
    with pytest.raises(ValueError, match="prompt_text\\[0\\] must be a non-empty string"):
        processor(one, prompt_audio=[wav_file], prompt_text=["  "])


@pytest.mark.parametrize(
    "source, message",
    [
        ((np.zeros(0, dtype=np.float32), 16000), "Empty audio"),
        ((np.array([0.0, np.nan] * 400, dtype=np.float32), 16000), "NaN or Inf"),
        ((np.array([0.0, np.inf] * 400, dtype=np.float32), 16000), "NaN or Inf"),
        (np.zeros(16000, dtype=np.float32), "need an explicit sampling rate"),
        (torch.zeros(16000), "need an explicit sampling rate"),
        ({"array": np.zeros(16000, dtype=np.float32)}, "needs its 'sampling_rate'"),
        ((np.zeros(16000, dtype=np.float32), 0), "positive integer"),
        ((np.zeros((16000, 2), dtype=np.float32), 16000), "looks like \\[T, channels\\]"),
        ((np.zeros(100, dtype=np.float32), 16000), "too short"),
        ("data:audio/wav;base64,@@not base64@@", "Invalid base64"),
        ("data:audio/wav,plain", "Only base64 data URIs"),
        ("/no/such/file.wav", "Audio file not found"),
        ("http://example.com/audio.wav", "Fetching audio from URLs is disabled"),
        ("https://example.com/audio.wav", "Fetching audio from URLs is disabled"),
        (b"definitely not audio" * 10, "Could not decode the audio bytes"),
        (12345, "Unsupported audio source"),
    ],
)
def test_audio_source_errors(processor, source, message):
    with pytest.raises(ValueError, match=message):
        processor([audio_message(source)])


def test_file_errors(processor, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not audio\n" * 20)
    fake_wav = tmp_path / "fake.wav"
    fake_wav.write_bytes(b"RIFF" + os.urandom(200))
    empty_wav = tmp_path / "empty.wav"
    sf.write(empty_wav, np.zeros(0, dtype=np.float32), 16000)
    for path in (text_file, fake_wav):
        with pytest.raises(ValueError, match="Could not decode the file"):
            processor([audio_message(str(path))])
    with pytest.raises(ValueError, match="Empty audio"):
        processor([audio_message(empty_wav)])
    with pytest.raises(ValueError, match="Could not decode the base64 string"):
        processor([audio_message(base64.b64encode(b"no audio in here at all, sorry" * 4).decode())])
    bad_openai = {"type": "input_audio", "input_audio": {"data": "%%%%" * 20, "format": "wav"}}
    with pytest.raises(ValueError, match="Invalid base64"):
        processor([{"role": "user", "content": [bad_openai]}])


def test_conversation_errors(processor):
    with pytest.raises(ValueError, match="Unsupported content item type 'image'"):
        processor([{"role": "user", "content": [{"type": "image", "image": "cat.png"}]}])
    with pytest.raises(ValueError, match="Unsupported content item type None"):
        processor([{"role": "user", "content": [{"text": "no type"}]}])
    with pytest.raises(ValueError, match="needs exactly one of 'audio', 'path' or 'url'"):
        processor([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="non-empty list"):
        processor([])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        processor([{"content": "Hi"}])
    with pytest.raises(ValueError, match="placeholders for 0 audio items"):
        processor([{"role": "user", "content": "I typed <|AUDIO|> myself"}])
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        processor([{"role": "user", "content": "Hi"}], audio=[1])


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


def test_decode_skips_special_tokens(processor):
    tokenizer = processor.tokenizer
    ids = tokenizer("Hello there!<|im_end|>")["input_ids"]
    batch = torch.tensor([[tokenizer.pad_token_id] + ids, ids + [tokenizer.pad_token_id]])
    assert processor.batch_decode(batch) == ["Hello there!", "Hello there!"]
    assert processor.decode(ids) == "Hello there!"
    assert processor.decode(ids, skip_special_tokens=False) == "Hello there!<|im_end|>"


def test_audio_to_numpy(processor):
    audio = torch.randn(2, 1, 3840)
    rows = processor.audio_to_numpy(audio, lengths=torch.tensor([3840, 1920]))
    assert [row.shape for row in rows] == [(3840,), (1920,)] and all(row.dtype == np.float32 for row in rows)
    np.testing.assert_array_equal(rows[1], audio[1, 0, :1920].numpy())
    listed = processor.audio_to_numpy([audio[0:1], audio[1, 0].to(torch.bfloat16)])
    assert [row.shape for row in listed] == [(3840,), (3840,)]
    assert processor.audio_to_numpy(audio[0, 0].numpy())[0].shape == (3840,)
    with pytest.raises(ValueError, match="outside the audio row"):
        processor.audio_to_numpy(audio, lengths=[4000, 10])
    with pytest.raises(ValueError, match="2 lengths for 1 audio rows"):
        processor.audio_to_numpy(audio[:1], lengths=[1, 2])
    with pytest.raises(ValueError, match="mono audio"):
        processor.audio_to_numpy(torch.zeros(1, 2, 10))


def test_audio_to_wav_bytes(processor):
    wave = sine(0.5, 24000)
    wave[:10] = 2.0  # out of range: clipped, not wrapped around
    files = processor.audio_to_wav_bytes(torch.from_numpy(wave)[None, None], lengths=[6000])
    assert len(files) == 1 and files[0][:4] == b"RIFF"
    info = sf.info(io.BytesIO(files[0]))
    assert (info.samplerate, info.frames, info.channels, info.subtype) == (24000, 6000, 1, "PCM_16")
    decoded, _ = sf.read(io.BytesIO(files[0]), dtype="float32")
    np.testing.assert_allclose(decoded[10:], wave[10:6000], atol=1 / 32767)
    assert decoded[:10].min() > 0.99
    float_file = processor.audio_to_wav_bytes(wave, subtype="FLOAT")[0]
    np.testing.assert_array_equal(sf.read(io.BytesIO(float_file), dtype="float32")[0], wave)


# ---------------------------------------------------------------------------------------------------------------------
# Saving, loading, remote code
# ---------------------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, wav_file):
    processor = save_tiny_processor(tmp_path / "saved")
    files = set(os.listdir(tmp_path / "saved"))
    assert {"processing_chroma.py", "processor_config.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    config = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_chroma.ChromaProcessor"
    assert config["processor_class"] == "ChromaProcessor"
    assert "allow_url_fetch" not in json.dumps(config)
    assert (tmp_path / "saved" / "processing_chroma.py").read_text() == Path(processing_chroma.__file__).read_text()

    loaded = ChromaProcessor.from_pretrained(tmp_path / "saved")
    assert loaded.chat_template == processor.chat_template
    assert loaded.feature_extractor.to_dict() == processor.feature_extractor.to_dict()
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    conversation = [audio_message(wav_file, "Hi")]
    expected = processor(conversation, prompt_audio=wav_file, prompt_text="Hello.")
    actual = loaded(conversation, prompt_audio=wav_file, prompt_text="Hello.")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


def test_auto_processor_remote_code(tmp_path, wav_file):
    """A fresh interpreter (openchroma not imported) loads the saved folder as remote code."""
    folder = tmp_path / "hub"
    processor = save_tiny_processor(folder)
    conversation = [audio_message(str(wav_file), "Hi")]
    expected = processor(conversation, prompt_audio=str(wav_file), prompt_text="Hello.")
    script = f"""
import json, sys
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
out = processor({conversation!r}, prompt_audio={str(wav_file)!r}, prompt_text="Hello.")
print(json.dumps({{
    "module": type(processor).__module__,
    "openchroma_imported": any(name.startswith("openchroma") for name in sys.modules),
    "outputs": {{key: value.tolist() for key, value in out.items()}},
}}))
"""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and not report["openchroma_imported"]
    for key, value in expected.items():
        torch.testing.assert_close(torch.tensor(report["outputs"][key], dtype=value.dtype), value)


# ---------------------------------------------------------------------------------------------------------------------
# Hub-file hygiene
# ---------------------------------------------------------------------------------------------------------------------


def test_processing_file_imports_only_allowed_modules():
    """Remote-code users need only torch, transformers, numpy, librosa and soundfile (plus the standard library)."""
    path = Path(processing_chroma.__file__)
    tree = ast.parse(path.read_text())
    allowed = {"torch", "transformers", "numpy", "librosa", "soundfile"} | set(sys.stdlib_module_names)
    for node in tree.body:
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:  # relative import of a sibling hub file
                continue
            roots = [node.module.split(".")[0]]
        else:
            continue
        for root in roots:
            assert root in allowed, f"processing_chroma.py imports {root} at top level"
    nested = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert len(nested) == sum(isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body)
    calls = [node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    assert "print" not in calls

    from transformers.dynamic_module_utils import get_imports

    third_party = set(get_imports(path)) - set(sys.stdlib_module_names)
    assert third_party <= {"torch", "transformers", "numpy", "librosa", "soundfile"}


def test_processing_file_has_no_token_ids():
    """Special tokens are looked up by string: no Qwen (151643..) or tiny (1000..1023) id appears as a literal."""
    tree = ast.parse(Path(processing_chroma.__file__).read_text())
    numbers = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and type(node.value) is int}
    assert not numbers & (set(range(151643, 151700)) | set(range(1000, 1024)))
