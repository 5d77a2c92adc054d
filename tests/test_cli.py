# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Command line (`cli/`): the `answer` pipeline end to end on the example clips with the tiny random model,
and its usage errors. No weights are downloaded; a run takes a few seconds on CPU."""

import logging
import re
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


# ----------------------------------------------------------------------------------------------------------------------
# A friendly command line: version, one-line usage errors, serve's checks, defaults in --help, clipping, progress
# ----------------------------------------------------------------------------------------------------------------------


def test_version(capsys):
    import transformers

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"openchroma 0.1.0 (transformers {transformers.__version__}, torch {torch.__version__})\n"


def assert_one_line_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith(("W1", "Failed to load"))]  # torch/torchao noise
    assert len(lines) == 2, err
    assert lines[0].startswith(f"openchroma {argv[0]}: error: ") and message in lines[0], err
    assert lines[1] == f"hint: run 'openchroma {argv[0]} --help' for the options"


def test_usage_errors_are_one_line_and_a_hint(tmp_path, capsys):
    assert_one_line_error(capsys, ["answer", QUESTION, "-o", str(tmp_path / "a.wav")], "--voice")
    assert_one_line_error(capsys, ["answer", QUESTION, "--voice", VOICE, "--voice-text", "Hi", "-o",
                                   str(tmp_path / "a.wav"), "--max-frames", "many"], "positive integer, got many")


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp: ["serve", "--model", str(tmp / "nope")], "model folder not found"),
        (lambda tmp: ["serve", "--register-voice", "x", str(tmp / "missing.wav"), VOICE_TEXT_FILE],
         "--register-voice x audio file not found"),
        (lambda tmp: ["serve", "--register-voice", "x", VOICE, str(tmp / "missing.txt")],
         "--register-voice x: transcript file not found"),
    ],
    ids=["missing-model-folder", "missing-voice-audio", "missing-voice-transcript"],
)
def test_serve_errors_are_as_clear_as_answers(tmp_path, capsys, make_args, message):
    """Checked before the model loads: one line and a hint, exit status 2, no traceback."""
    assert_one_line_error(capsys, make_args(tmp_path), message)


def test_help_shows_the_program_name_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: openchroma serve")
    from openchroma.cli import DefaultsHelpFormatter, build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, subparser in subparsers.choices.items():
        formatter = DefaultsHelpFormatter(prog=name)
        for action in subparser._actions:
            if action.help and action.default not in (None, False, [], "==SUPPRESS=="):
                assert "default" in formatter._expand_help(action), (name, action.option_strings)
    assert "(default: 2)" in text  # e.g. --chunk-frames
    with pytest.raises(SystemExit):
        main(["answer", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: openchroma answer")
    assert "(default: None)" not in text and "(default: False)" not in text


def test_clipping_is_reported_and_normalize_fits_the_answer(tmp_path, capsys, caplog):
    """The tiny model's noise goes far beyond full scale: the plain run clips and says so; --normalize scales the
    answer to a 0.95 peak instead, a pure rescaling of the same waveform."""
    clipped, normalized = tmp_path / "clipped.wav", tmp_path / "normalized.wav"
    with caplog.at_level(logging.INFO, logger="openchroma.cli"):
        assert main(answer_args(clipped)) == 0
    assert "are beyond full scale and clipped; --normalize" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="openchroma.cli"):
        assert main(answer_args(normalized, "--normalize")) == 0
    assert "clipped" not in caplog.text
    plain, _ = sf.read(str(clipped), dtype="float32")
    scaled, _ = sf.read(str(normalized), dtype="float32")
    assert abs(float(abs(scaled).max()) - 0.95) < 1e-4
    inside = abs(plain) < 0.99  # samples the plain run kept: the normalized file is them times one factor
    ratios = scaled[inside & (abs(plain) > 0.05)] / plain[inside & (abs(plain) > 0.05)]
    assert ratios.std() < 1e-2 * ratios.mean()


def test_per_frame_progress_bar_with_log_lines_above_it(tmp_path, capsys, monkeypatch):
    """On a terminal, generation shows a frame counter; log records are written on their own lines, never into
    the bar's line."""
    import openchroma.cli as cli

    monkeypatch.setattr(cli, "show_progress", lambda args: True)
    assert main(answer_args(tmp_path / "a.wav")) == 0
    err = capsys.readouterr().err
    assert f"{FRAMES}/{FRAMES}" in err and "frame" in err
    for segment in err.replace("\r", "\n").split("\n"):
        if "openchroma: " in segment:
            assert segment.startswith("openchroma: "), segment


FINETUNE_EXAMPLE = {
    "messages": [{"role": "user", "content": [{"type": "audio", "audio": QUESTION}]}],
    "answer_text": "Hi.", "answer_audio": VOICE, "reference_audio": VOICE, "reference_text": "Hi.",
}


SPOKEN_ANSWER = "The train leaves at half past nine from platform two."


def test_finetune_log_lines_do_not_break_its_progress_bar(tmp_path):
    """Also: on a natural spoken answer (espeak-ng, 3.1 words/s) the tiny model's length warning gives the rate and
    says why it fires there (its test tokenizer cuts words into ~1.4-character pieces)."""
    import json
    import shutil
    import subprocess
    import sys

    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng (apt-get install espeak-ng; .ci/run installs it)")
    answer = tmp_path / "answer.wav"
    subprocess.run(["espeak-ng", "-w", str(answer), SPOKEN_ANSWER], check=True)
    data = tmp_path / "train.jsonl"
    example = {**FINETUNE_EXAMPLE, "answer_text": SPOKEN_ANSWER, "answer_audio": str(answer)}
    data.write_text(json.dumps(example) + "\n")
    command = [sys.executable, "-m", "openchroma.training", "--model", "tiny", "--data", str(data), "--output-dir",
               str(tmp_path / "out"), "--max-steps", "3", "--log-steps", "1", "--cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finetune: 100%" in result.stderr
    assert re.search(r"too short for its text \(\d+ tokens with <\|im_end\|>, \d+\.\d tokens/s; generation feeds "
                     r"at most 6\.25 tokens/s.*with --model tiny this is expected", result.stderr), result.stderr[-3000:]
    for segment in result.stderr.replace("\r", "\n").split("\n"):
        if " INFO openchroma.finetune: " in segment:
            assert segment[:4].isdigit(), segment  # the record starts its own line (with its timestamp)
