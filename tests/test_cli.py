# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Command line (`cli_chroma.py`): the `answer` pipeline end to end on the example clips with the tiny random model,
and its usage errors. No weights are downloaded; a run takes a few seconds on CPU."""

import logging
from pathlib import Path

import pytest
import soundfile as sf
import torch

from openchroma import ChromaForConditionalGeneration
from openchroma.cli import main

from openchroma.testing import TINY_MODEL_SEED, save_tiny_checkpoint


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUESTION = str(EXAMPLES / "question.wav")
VOICE = str(EXAMPLES / "voice.wav")
VOICE_TEXT_FILE = str(EXAMPLES / "voice.txt")
FRAMES = 6
SAMPLES_PER_FRAME = 1920  # 80 ms at 24 kHz


def answer_args(output, *extra, transcript=("--voice-text-file", VOICE_TEXT_FILE)):
    return ["answer", QUESTION, "--voice", VOICE, *transcript, "-o", str(output), "--max-frames", str(FRAMES),
            "--device", "cpu", "--no-progress", *extra]


def test_answer_writes_wav_and_prints_transcript(tmp_path, capsys, caplog):
    """The whole pipeline (processor, generate, Mimi decode, WAV) runs; stdout holds the transcript and nothing else,
    and the user is told loudly that the default model is random."""
    output = tmp_path / "answer.wav"
    with caplog.at_level(logging.INFO, logger="openchroma.cli"):
        assert main(answer_args(output)) == 0

    info = sf.info(str(output))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.frames == FRAMES * SAMPLES_PER_FRAME
    assert sf.read(str(output))[0].any(), "the decoded audio is all zeros"
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, f"stdout must be the transcript line only, got {out!r}"
    assert "RANDOM" in caplog.text and "NOISE" in caplog.text


@pytest.fixture
def generated_codes(monkeypatch):
    """The audio codes of every `generate` call (answers are compared by their codes, the most direct evidence)."""
    codes = []
    original_generate = ChromaForConditionalGeneration.generate

    def recording_generate(self, *args, **kwargs):
        output = original_generate(self, *args, **kwargs)
        codes.append(output.sequences.clone())
        return output

    monkeypatch.setattr(ChromaForConditionalGeneration, "generate", recording_generate)
    return codes


def test_seed_makes_sampling_reproducible(tmp_path, capsys, generated_codes):
    """--do-sample with the same --seed gives the same codes, another seed other codes (so the options reach the
    sampler and sampling is on)."""
    for index, seed in enumerate(["7", "7", "8"]):
        output = tmp_path / f"{index}.wav"
        args = answer_args(output, "--do-sample", "--seed", seed, "--top-k", "20", transcript=("--voice-text", "Hi."))
        assert main(args) == 0
        assert sf.info(str(output)).frames == FRAMES * SAMPLES_PER_FRAME
    first, again, other = generated_codes
    assert first.shape == (1, FRAMES, 8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_local_folder_model_matches_the_embedded_tiny_model(tmp_path, capsys, generated_codes):
    """--model FOLDER goes through AutoProcessor/AutoModelForCausalLM; a folder saved from the same tiny model
    must give the same answer (codes and text) as the embedded one."""
    folder = tmp_path / "tiny"
    save_tiny_checkpoint(folder, seed=TINY_MODEL_SEED)
    assert main(answer_args(tmp_path / "embedded.wav")) == 0
    assert main(answer_args(tmp_path / "loaded.wav", "--model", str(folder), "--no-trust-remote-code")) == 0
    embedded, loaded = generated_codes
    assert torch.equal(embedded, loaded)
    transcripts = capsys.readouterr().out.splitlines()
    assert len(transcripts) == 2 and transcripts[0] == transcripts[1]


def bad_audio(tmp_path):
    path = tmp_path / "not_audio.wav"
    path.write_text("this is not a wav file")
    return str(path)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp: ["answer", QUESTION, "--voice", VOICE, "-o", str(tmp / "a.wav")], "--voice-text"),
        (lambda tmp: ["answer", str(tmp / "missing.wav"), "--voice", VOICE, "--voice-text", "Hi", "-o",
                      str(tmp / "a.wav")], "question file not found"),
        (lambda tmp: ["answer", QUESTION, "--voice", str(tmp / "missing.wav"), "--voice-text", "Hi", "-o",
                      str(tmp / "a.wav")], "reference voice file not found"),
        (lambda tmp: ["answer", bad_audio(tmp), "--voice", VOICE, "--voice-text", "Hi", "-o", str(tmp / "a.wav")],
         "cannot read the question file"),
        (lambda tmp: ["answer", QUESTION, "--voice", VOICE, "--voice-text-file", str(tmp / "missing.txt"), "-o",
                      str(tmp / "a.wav")], "transcript file not found"),
        (lambda tmp: ["answer", QUESTION, "--voice", VOICE, "--voice-text", "  ", "-o", str(tmp / "a.wav")],
         "transcript is empty"),
        (lambda tmp: ["answer", QUESTION, "--voice", VOICE, "--voice-text", "Hi", "-o", str(tmp / "no" / "a.wav")],
         "output folder does not exist"),
        (lambda tmp: ["answer", QUESTION, "--voice", VOICE, "--voice-text", "Hi", "-o", str(tmp / "a.wav"),
                      "--model", str(tmp / "no_such_model")], "model folder not found"),
        (lambda tmp: ["answer", QUESTION, "--voice", VOICE, "--voice-text", "Hi", "-o", str(tmp / "a.wav"),
                      "--max-frames", "0"], "positive integer"),
        (lambda tmp: ["answer", QUESTION, "--voice-text", "Hi", "-o", str(tmp / "a.wav")], "--voice"),
    ],
    ids=["voice-without-text", "missing-question", "missing-voice", "unreadable-audio", "missing-text-file",
         "empty-text", "missing-output-folder", "missing-model-folder", "zero-frames", "no-voice"],
)
def test_usage_errors_exit_2_before_loading_a_model(tmp_path, capsys, make_args, message):
    """Bad input is reported with exit status 2 and a message naming the problem, and nothing is written."""
    with pytest.raises(SystemExit) as exit_info:
        main(make_args(tmp_path))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""
    assert not (tmp_path / "a.wav").exists()


def test_speak_says_the_given_text(tmp_path, capsys, generated_codes):
    """`speak` feeds the text's tokens to the thinker (forced) and prints what it spoke: the given text."""
    output = tmp_path / "speak.wav"
    args = ["speak", "Hello there.", "--voice", VOICE, "--voice-text-file", VOICE_TEXT_FILE, "-o", str(output),
            "--max-frames", "12", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert sf.info(str(output)).frames == 12 * SAMPLES_PER_FRAME
    spoken = capsys.readouterr().out.strip()
    assert spoken and "Hello there.".startswith(spoken), spoken  # the random thinker would say gibberish
    with pytest.raises(SystemExit) as exit_info:
        main(["speak", "   ", "--voice", VOICE, "--voice-text", "Hi.", "-o", str(output)])
    assert exit_info.value.code == 2


def test_serve_subcommand_is_wired(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    assert "--api-key" in capsys.readouterr().out
