"""Mimi runs in float32 whatever the model's dtype (issue 16): `ChromaConfig.codec_dtype`, transformers'
keep-in-fp32 mechanism, voice codes and decoded audio of a bfloat16 model equal those of a float32 model."""

import pytest
import torch

from conftest import reference
from openchroma import ChromaConfig, ChromaForConditionalGeneration
from openchroma.testing import save_tiny_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model, _ = save_tiny_checkpoint(folder)
    return folder, model


def voice_wave():
    """3 s of a voice-like signal at 24 kHz (a harmonic tone with noise), [1, T]."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(72000) / 24000
    return (0.3 * torch.sin(2 * torch.pi * 180 * t) + 0.05 * torch.randn(t.shape, generator=g))[None]


def test_bfloat16_model_keeps_mimi_in_float32(checkpoint):
    folder, _ = checkpoint
    model = ChromaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.backbone.codebook0_head.weight.dtype == torch.bfloat16
    assert model.thinker.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.codec_model.parameters()} == {torch.float32}
    assert {b.dtype for b in model.codec_model.buffers() if b.is_floating_point()} == {torch.float32}


def test_voice_codes_of_a_bfloat16_model_equal_the_float32_codes(checkpoint):
    folder, float_model = checkpoint
    ids = torch.tensor([5, 6, 7])
    expected = float_model.encode_voice(voice_wave(), ids).codes
    model = ChromaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    assert torch.equal(model.encode_voice(voice_wave(), ids).codes, expected)
    # the option to follow the model's dtype: Mimi in bfloat16 changes the codes (what float32 protects against)
    following = ChromaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, codec_dtype="model")
    assert following.codec_model.dtype == torch.bfloat16
    changed = (following.encode_voice(voice_wave(), ids).codes != expected).float().mean()
    assert changed > 0.05


def test_decoded_audio_of_a_bfloat16_model_equals_the_float32_audio(checkpoint):
    folder, float_model = checkpoint
    codes = torch.randint(0, 2048, (1, 8, 12), generator=torch.Generator().manual_seed(1))
    expected = float_model.codec_model.decode(codes).audio_values
    model = ChromaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    audio = model.codec_model.decode(codes).audio_values
    assert audio.dtype == torch.float32
    torch.testing.assert_close(audio, expected, atol=1e-6, rtol=0)
    decoder = model.streaming_audio_decoder()
    pcm = decoder.decode_chunk(codes, decoder.init_state(1))
    assert pcm.dtype == torch.float32
    torch.testing.assert_close(pcm, expected[:, 0], atol=1e-5 * expected.abs().max().item(), rtol=0)


def test_generation_of_a_bfloat16_model_streams_float32_audio(checkpoint):
    folder, _ = checkpoint
    model = ChromaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    chunks = list(model.stream(**reference("reference_tiny").inputs, max_new_tokens=4))
    codes = torch.cat([c.audio_codes for c in chunks], dim=1)
    pcm = torch.cat([c.pcm for c in chunks], dim=1)
    assert pcm.dtype == torch.float32 and pcm.shape == (1, 4 * model.config.audio_frame_freq)
    one_shot = model.codec_model.decode(codes.permute(0, 2, 1)).audio_values[:, 0]
    torch.testing.assert_close(pcm, one_shot, atol=1e-5 * one_shot.abs().max().item(), rtol=0)


def test_codec_dtype_is_saved_and_validated(checkpoint, tmp_path):
    folder, _ = checkpoint
    model = ChromaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, codec_dtype="model")
    model.save_pretrained(tmp_path)
    reloaded = ChromaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert reloaded.config.codec_dtype == "model" and reloaded.codec_model.dtype == torch.bfloat16
    assert ChromaConfig.tiny().codec_dtype == "float32"
    with pytest.raises(ValueError, match="codec_dtype must be 'float32' or 'model', got 'float16'"):
        ChromaConfig.tiny(codec_dtype="float16")
