"""transformers conventions: `pipeline("text-to-speech" | "any-to-any", model=folder, trust_remote_code=True)`,
`config.sampling_rate`, the processor's `decode`/`batch_decode` of audio codes and `save_audio` (as CSM and Dia
offer). Every result is compared with the library's own generate() + Mimi decode, never with itself."""

import logging
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from pathlib import Path

from openchroma.testing import build_tiny_model, build_tiny_processor, save_tiny_checkpoint


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VOICE = str(EXAMPLES / "voice.wav")
QUESTION = str(EXAMPLES / "question.wav")
VOICE_TEXT = (EXAMPLES / "voice.txt").read_text().strip()
FRAMES = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("pipeline") / "tiny-pipeline"  # transformers 5.0 caches remote code by folder name
    save_tiny_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def model_and_processor():
    return build_tiny_model(), build_tiny_processor()


def library_answer(model, processor, conversation, **extra):
    """The library's own result: generate() then the codec's decode, cut to the valid frames."""
    inputs = processor(conversation, prompt_audio=VOICE, prompt_text=VOICE_TEXT)
    out = model.generate(**inputs, max_new_tokens=FRAMES, return_dict_in_generate=True, **extra)
    frames = int(out.audio_lengths[0])
    audio = model.codec_model.decode(out.sequences[:, :frames].permute(0, 2, 1)).audio_values[0, 0]
    text = processor.tokenizer.decode(out.text_sequences[0, : int(out.text_lengths[0])], skip_special_tokens=True)
    return audio.detach().numpy(), text.strip()


def test_text_to_speech_pipeline_speaks_the_text_like_generate(folder):
    from transformers import pipeline

    tts = pipeline("text-to-speech", model=folder, trust_remote_code=True)
    assert type(tts).__name__ == "ChromaTextToSpeechPipeline"
    result = tts("Hello there.", voice=VOICE, voice_text=VOICE_TEXT, max_new_tokens=FRAMES)
    assert set(result) == {"audio", "sampling_rate"} and result["sampling_rate"] == 24000

    model, processor = tts.model, tts.processor
    ids = processor.tokenizer("Hello there.", add_special_tokens=False).input_ids
    pipeline_module = sys.modules[type(tts).__module__]  # the remote-code copy of pipeline_chroma.py
    conversation = [{"role": "system", "content": pipeline_module.SPEAK_SYSTEM_PROMPT},
                    {"role": "user", "content": "Please say exactly this: Hello there."}]
    expected, _ = library_answer(model, processor, conversation, forced_text_ids=[torch.tensor(ids)])
    assert result["audio"].dtype == np.float32 and result["audio"].shape == expected.shape == (FRAMES * 1920,)
    np.testing.assert_allclose(result["audio"], expected, atol=1e-5)


def test_any_to_any_pipeline_answers_a_conversation_like_generate(folder):
    from transformers import pipeline

    chat = pipeline("any-to-any", model=folder, trust_remote_code=True)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": QUESTION}]}]
    result = chat(conversation, voice=VOICE, voice_text=VOICE_TEXT, max_new_tokens=FRAMES)
    assert set(result) == {"generated_text", "generated_audio", "sampling_rate"}
    expected_audio, expected_text = library_answer(chat.model, chat.processor, conversation)
    assert result["generated_text"] == expected_text
    np.testing.assert_allclose(result["generated_audio"], expected_audio, atol=1e-5)


def test_pipeline_needs_a_voice_with_its_transcript(folder):
    from transformers import pipeline

    tts = pipeline("text-to-speech", model=folder, trust_remote_code=True)
    with pytest.raises(ValueError, match="reference voice"):
        tts("Hello.")
    with pytest.raises(ValueError, match="voice_text"):
        tts("Hello.", voice=VOICE)
    with pytest.raises(ValueError, match="Unknown argument"):
        tts("Hello.", voice=VOICE, voice_text=VOICE_TEXT, max_frames=3)


def test_config_sampling_rate_is_the_codec_rate(model_and_processor):
    model, processor = model_and_processor
    assert model.config.sampling_rate == model.config.codec_config.sampling_rate == 24000
    assert "sampling_rate" not in model.config.to_dict()  # derived, never saved twice


def test_processor_decodes_codes_and_text(model_and_processor):
    """3-D codes -> waveforms through Mimi, cut to each row's frames; 1-D/2-D ids -> text as before."""
    model, processor = model_and_processor
    torch.manual_seed(0)
    codes = torch.randint(0, 2048, (2, 5, 8))
    codes[1, 3:] = 0
    with torch.no_grad():
        reference = model.codec_model.decode(codes.permute(0, 2, 1)).audio_values  # [2, 1, 5 * 1920]
    waveforms = processor.batch_decode(codes, codec_model=model.codec_model, audio_lengths=torch.tensor([5, 3]))
    assert [w.shape[0] for w in waveforms] == [5 * 1920, 3 * 1920]
    torch.testing.assert_close(waveforms[0], reference[0, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(waveforms[1], reference[1, 0, : 3 * 1920], atol=1e-5, rtol=0)
    single = processor.decode(codes[:1], codec_model=model.codec_model)
    with torch.no_grad():  # the same batch size as the reference (batched Mimi differs at float32 rounding level)
        reference_single = model.codec_model.decode(codes[:1].permute(0, 2, 1)).audio_values
    torch.testing.assert_close(single, reference_single[0, 0], atol=1e-5, rtol=0)

    ids = processor.tokenizer("Hello there.", add_special_tokens=False, return_tensors="pt").input_ids
    assert processor.decode(ids[0]) == "Hello there."
    assert processor.batch_decode(ids) == ["Hello there."]


def test_processor_decode_errors(model_and_processor):
    model, processor = model_and_processor
    codes = torch.zeros(2, 3, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="codec_model=model.codec_model"):
        processor.batch_decode(codes)
    with pytest.raises(ValueError, match="one row of audio codes"):
        processor.decode(codes, codec_model=model.codec_model)
    with pytest.raises(ValueError, match="audio_lengths"):
        processor.batch_decode(codes, codec_model=model.codec_model, audio_lengths=[3, 4])
    with pytest.raises(ValueError, match="for audio codes"):
        processor.batch_decode(torch.zeros(1, 3, dtype=torch.long), codec_model=model.codec_model)


def test_save_audio_writes_files_and_warns_on_clipping(model_and_processor, tmp_path, caplog):
    _, processor = model_and_processor
    quiet = torch.linspace(-0.5, 0.5, 2400)
    loud = torch.linspace(-2.0, 2.0, 2400)  # half its samples beyond [-1, 1]
    paths = [tmp_path / "quiet.wav", tmp_path / "loud.wav"]
    with caplog.at_level(logging.WARNING):
        processor.save_audio([quiet, loud.numpy()], paths)
    for path, source in zip(paths, (quiet, loud.clamp(-1, 1))):
        data, rate = sf.read(str(path), dtype="float32")
        assert rate == 24000
        np.testing.assert_allclose(data, source.numpy(), atol=1 / 32767)
    clipped = int((loud.abs() > 1).sum())
    assert f"loud.wav: {clipped} of 2400 samples" in caplog.text and "quiet.wav" not in caplog.text
    with pytest.raises(ValueError, match="one path per waveform"):
        processor.save_audio([quiet, quiet], tmp_path / "one.wav")
