"""`load_audio`'s budget (the one audio reader of the library and the server): audio over `max_seconds`, or holding
more samples than `max_seconds` of 48 kHz stereo, is refused from its header, before it is decoded or resampled.

"Before decoding" is asserted with tracemalloc (numpy reports its buffers to it): refusing a file whose decoded
samples would take over 100 MB allocates almost nothing.
"""

import io
import shutil
import subprocess
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from openchroma.processing_chroma import AudioLimitError, audio_string_kind, load_audio
from openchroma.testing import build_tiny_processor


def flac_silence(seconds: int, rate: int, channels: int) -> bytes:
    """Silence as FLAC, written one second at a time: a small file that decodes to seconds x rate x channels."""
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", rate, channels, format="FLAC", subtype="PCM_16") as file:
        block = np.zeros((rate, channels), dtype=np.int16)
        for _ in range(seconds):
            file.write(block)
    return buffer.getvalue()


def wav(seconds: float, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.sin(np.arange(int(seconds * rate)) / 7.0).astype(np.float32) * 0.3, rate, format="WAV")
    return buffer.getvalue()


def peak_bytes_of(function) -> int:
    tracemalloc.start()
    try:
        function()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_many_channels_at_a_high_rate_are_refused_from_the_header():
    data = flac_silence(20, 192000, 8)  # 20 s (under 30 s) but 30.7 M samples: 123 MB as float32
    assert len(data) < 2_000_000

    def refuse():
        with pytest.raises(AudioLimitError, match="more samples than 30 s of 48 kHz stereo"):
            load_audio(data, 16000, max_seconds=30)

    assert peak_bytes_of(refuse) < 20_000_000  # the samples were never decoded


def test_duration_limit_and_unchanged_audio_under_it():
    clip = wav(3.0)
    with pytest.raises(AudioLimitError, match="longer than 2 s"):
        load_audio(clip, 16000, max_seconds=2)
    np.testing.assert_array_equal(load_audio(clip, 16000, max_seconds=3), load_audio(clip, 16000))
    with pytest.raises(AudioLimitError, match="longer than 1 s"):  # arrays too, before resampling
        load_audio((np.zeros((2, 96000), np.float32), 48000), 16000, max_seconds=1)
    with pytest.raises(AudioLimitError, match="holds more samples"):
        load_audio((np.zeros((8, 200000), np.float32), 192000), 16000, max_seconds=2)


def test_the_processor_protects_library_users():
    """The processor reads user audio with its feature extractor's length as the budget (300 s here): a small
    FLAC of 8 channels at 192 kHz for 40 s (61 M samples) is refused before it is decoded."""
    processor = build_tiny_processor()
    data = flac_silence(40, 192000, 8)
    message = [{"role": "user", "content": [{"type": "audio", "audio": data}]}]

    def refuse():
        with pytest.raises(AudioLimitError, match="holds more samples"):
            processor(message)

    assert peak_bytes_of(refuse) < 20_000_000


def test_decode_errors_name_no_object_or_temporary_path():
    with pytest.raises(ValueError, match="Could not decode the audio bytes") as error:
        load_audio(b"definitely not audio" * 20, 16000, max_seconds=10)
    assert "object at" not in str(error.value) and "/tmp" not in str(error.value)


@pytest.mark.parametrize("text, kind", [
    ("data:audio/wav;base64,AAAA", "data"), ("file:///tmp/a.wav", "file"), ("https://example.com/a.wav", "url"),
    ("HTTP://example.com/a.wav", "url"), ("A" * 64, "base64"), ("clips/question.wav", "path"),
    ("clip\x00.wav", "path"), ("/abs/path.wav", "path"),
])
def test_audio_string_kind(text, kind):
    assert audio_string_kind(text) == kind


def test_strings_are_never_paths_when_local_files_are_off(tmp_path):
    path = tmp_path / "clip.wav"
    path.write_bytes(wav(0.5))
    with pytest.raises(ValueError, match="file paths are not accepted"):
        load_audio(str(path), 16000, allow_local_files=False)
    assert len(load_audio(str(path), 16000)) == 8000


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg (audioread's decoder for AAC)")
def test_formats_only_ffmpeg_reads_are_probed_before_decoding(tmp_path):
    """An AAC file (soundfile cannot read it): 300 s would decode to 19 MB of float32; with a 2 s budget it is
    refused from ffmpeg's header probe, and one within the budget decodes as without one."""
    long_clip, short_clip = tmp_path / "long.m4a", tmp_path / "short.m4a"
    for path, seconds in ((long_clip, 300), (short_clip, 3)):
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"sine=frequency=220:duration={seconds}",
                        "-ar", "16000", "-ac", "1", "-c:a", "aac", "-b:a", "16k", str(path)], check=True)

    with pytest.raises(AudioLimitError, match="longer than 2 s"):
        load_audio(str(short_clip), 16000, max_seconds=2)
    np.testing.assert_array_equal(load_audio(str(short_clip), 16000, max_seconds=5), load_audio(str(short_clip), 16000))

    def refuse():  # measured after the calls above imported what decoding needs
        with pytest.raises(AudioLimitError, match="longer than 2 s"):
            load_audio(str(long_clip), 16000, max_seconds=2)

    assert peak_bytes_of(refuse) < 4_000_000
