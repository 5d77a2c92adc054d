# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Command line for Chroma: ask a spoken question, hear the answer in a cloned voice.

    openchroma answer examples/question.wav \\
        --voice examples/voice.wav --voice-text-file examples/voice.txt -o answer.wav [--model FOLDER_OR_HUB_ID]

`answer` writes the spoken answer (24 kHz mono 16-bit WAV) and prints its text on stdout; stdout carries nothing
else, status goes to stderr through logging. Without --model it runs a tiny RANDOM model (noise and gibberish):
a smoke test of the whole pipeline that needs no download.

Subcommands:
    answer   spoken question + reference voice -> spoken answer (WAV) and its text
    speak    text -> speech in the reference voice (WAV), and the text it spoke
    serve    OpenAI-compatible HTTP server (needs the `server` extra; see docs/server.md)

Not a hub file: no configuration_/modeling_/generation_/processing_chroma.py imports it, so it may use any installed
package. Usage errors (missing files, unreadable audio, a voice without its transcript) are reported in one line
plus a hint and exit with status 2, before any model loads.
"""

import argparse
import contextlib
import itertools
import logging
import os
import sys
import threading
import time

import numpy as np
import soundfile as sf
import torch

from ..quantization import MODES as QUANTIZATION_MODES
from ..quantization import check_mode as check_quantization_mode
from ..quantization import load_quantized
from ..pipeline_chroma import SPEAK_REQUEST, SPEAK_SYSTEM_PROMPT
from ..testing import TINY_MODEL_SEED


try:  # tqdm comes with transformers / huggingface_hub, but the command works without it
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
except ImportError:  # pragma: no cover
    tqdm = None

logger = logging.getLogger("openchroma.cli")

# The system prompt of the official README and notebook.
DEFAULT_SYSTEM_PROMPT = SPEAK_SYSTEM_PROMPT
# The tiny random model: its weights come from this torch seed, so every run builds the same model.
# The tiny model never decides to stop; without --max-frames it generates this many frames (80 ms each).
TINY_DEFAULT_MAX_FRAMES = 50
TINY_MODEL_WARNING = (
    "No --model given: using a tiny RANDOM model (ChromaConfig.tiny(), seed %d) to test the pipeline. "
    "Its audio is NOISE and its text is GIBBERISH. Pass --model with a Chroma checkpoint (hub id or folder) for real "
    "answers."
)
# Seconds between redraws of the progress spinner.
SPINNER_INTERVAL_S = 0.25
# --normalize scales the answer to this peak (about -0.4 dBFS), leaving headroom below full scale.
NORMALIZE_PEAK = 0.95


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors in one line plus a hint (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\nhint: run '{self.prog} --help' for the options\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Show each option's default in --help, unless it has none or the help text already names it."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        hidden = (None, False, argparse.SUPPRESS, [])
        if "default" in help_text or action.default in hidden or not action.option_strings:
            return help_text
        return help_text + " (default: %(default)s)"


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="openchroma",
        description="Chroma 1.0 spoken dialogue with voice cloning (openchroma).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    answer = commands.add_parser(
        "answer",
        formatter_class=DefaultsHelpFormatter,
        help="answer a spoken question in a reference voice",
        description="Answer a spoken question (audio file) in the voice of a reference recording. Writes the spoken "
        "answer as a 24 kHz WAV and prints its text.",
    )
    answer.set_defaults(run=run_answer, parser=answer)
    answer.add_argument("question", metavar="QUESTION", help="audio file with the spoken question (wav, flac, ...)")
    add_voice_and_model_options(answer)

    speak = commands.add_parser(
        "speak",
        formatter_class=DefaultsHelpFormatter,
        help="say a given text in a reference voice",
        description="Text to speech: the model speaks TEXT (its thinker reads the text instead of answering) in the "
        "voice of a reference recording. Writes a 24 kHz WAV.",
    )
    speak.set_defaults(run=run_speak, parser=speak)
    speak.add_argument("text", metavar="TEXT", help="what to say")
    add_voice_and_model_options(speak)

    serve = commands.add_parser(
        "serve",
        formatter_class=DefaultsHelpFormatter,
        help="run the OpenAI-compatible HTTP server (needs: pip install 'openchroma[server]')",
        description="OpenAI-compatible speech server: /v1/chat/completions, /v1/audio/speech, /v1/audio/voices. "
        "See docs/server.md.",
    )
    serve.set_defaults(run=run_serve, parser=serve)
    try:
        from ..serving.app import add_serve_arguments
    except ImportError:  # the server extra is not installed: `serve` explains how to get it
        serve.set_defaults(run=run_serve_missing)
    else:
        add_serve_arguments(serve)

    return parser


def add_voice_and_model_options(answer) -> None:
    """Options `answer` and `speak` share: the voice, the model, sampling, device, output."""
    answer.add_argument("--voice", required=True, metavar="REF", help="reference voice to clone (audio file, a few s)")
    voice_text = answer.add_mutually_exclusive_group()
    voice_text.add_argument("--voice-text", metavar="TEXT", help="exact transcript of the reference voice")
    voice_text.add_argument("--voice-text-file", metavar="FILE", help="UTF-8 file holding that transcript")
    answer.add_argument("-o", "--output", required=True, metavar="OUT.wav", help="where to write the spoken answer")
    answer.add_argument(
        "--model",
        metavar="HUB_ID_OR_FOLDER",
        help="Chroma checkpoint (hub id or local folder); default: a tiny random model for smoke tests",
    )
    answer.add_argument(
        "--trust-remote-code",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run the code shipped with the checkpoint instead of the installed openchroma classes (default: ours; "
        "the published checkpoint's own code needs transformers 5.0.0rc0)",
    )
    answer.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt (default: the official one)")
    answer.add_argument(
        "--max-frames",
        type=positive_int,
        metavar="N",
        help="most audio frames to generate, 80 ms each (default: the model's, 1000 = 80 s; "
        f"{TINY_DEFAULT_MAX_FRAMES} for the tiny model)",
    )
    answer.add_argument("--seed", type=int, help="random seed for sampling")
    answer.add_argument(
        "--do-sample",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample the audio codes instead of taking the most likely (default: the model's setting, greedy)",
    )
    answer.add_argument("--temperature", type=float, help="sampling temperature (with --do-sample)")
    answer.add_argument("--top-k", type=int, help="keep the k most likely codes (with --do-sample)")
    answer.add_argument("--top-p", type=float, help="nucleus sampling threshold (with --do-sample)")
    answer.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    answer.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="weights' dtype (default: bfloat16 on cuda, else float32)"
    )
    answer.add_argument("--quantize", choices=list(QUANTIZATION_MODES),
                        help="load the thinker and backbone quantized (int8: CPU or CUDA; int4, bnb-8bit, bnb-4bit: "
                             "CUDA; needs the quant extra); see docs/quantization.md")
    answer.add_argument("--normalize", action="store_true",
                        help=f"scale the answer to a peak of {NORMALIZE_PEAK} (no clipping, fixed loudness)")
    answer.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    answer.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def version_line() -> str:
    import transformers

    from .. import __version__

    return f"openchroma {__version__} (transformers {transformers.__version__}, torch {torch.__version__})"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv=None) -> int:
    """Run the command line; returns the exit status (usage errors raise SystemExit(2), as argparse does)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("openchroma: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    try:
        return args.run(args)
    finally:
        logger.removeHandler(handler)


def run_serve(args) -> int:
    from ..serving.app import serve

    check_serve_args(args)
    return serve(args)


def check_serve_args(args) -> None:
    """The checks `answer` makes, before the model loads: the model folder and every --register-voice file."""
    parser = args.parser
    if args.model is not None:
        args.model = check_model_name(parser, args.model)
    for voice_id, audio_path, transcript_path in args.register_voice:
        check_audio_file(parser, audio_path, f"--register-voice {voice_id} audio")
        if not os.path.isfile(transcript_path):
            parser.error(f"--register-voice {voice_id}: transcript file not found: {transcript_path}")


def run_serve_missing(args) -> int:
    logger.error("`serve` needs the server extra: pip install 'openchroma[server]'")
    return 1


# ----------------------------------------------------------------------------------------------------------------------
# answer
# ----------------------------------------------------------------------------------------------------------------------


def run_answer(args) -> int:
    parser = args.parser
    voice_text, device, dtype, max_frames = check_answer_args(args)

    if args.model is None:
        logger.warning(TINY_MODEL_WARNING, TINY_MODEL_SEED)
    start = time.perf_counter()
    # A checkpoint shows transformers' own download and "Loading weights" bars (with ours on); the tiny model a spinner.
    with phase("loading model", args, spinner=args.model is None), library_progress_bars(show_progress(args)):
        try:
            model, processor = load_model(args.model, device, dtype, args.trust_remote_code, args.quantize)
        except (OSError, ValueError) as error:
            logger.error("could not load the model %r: %s", args.model, error)
            return 1
    logger.info("model %s loaded on %s (%s) in %.1f s", args.model or "tiny-random", device,
                str(dtype).removeprefix("torch."), elapsed(start))

    extra = {}
    if getattr(args, "question", None) is not None:
        conversation = [
            {"role": "system", "content": args.system},
            {"role": "user", "content": [{"type": "audio", "audio": args.question}]},
        ]
    else:  # speak: the thinker reads the given text instead of choosing its own words
        conversation = [
            {"role": "system", "content": args.system},
            {"role": "user", "content": SPEAK_REQUEST.format(text=args.text)},
        ]
        ids = processor.tokenizer(args.text, add_special_tokens=False).input_ids
        if not ids:
            parser.error("the text to speak is empty")
        extra["forced_text_ids"] = [torch.tensor(ids)]
    with phase("reading audio", args):
        try:
            inputs = processor(
                conversation, add_generation_prompt=True, tokenize=False,
                prompt_audio=[args.voice], prompt_text=[voice_text],
            )
        except ValueError as error:
            parser.error(str(error))

    start = time.perf_counter()
    total = max_frames or model.generation_config.max_new_tokens
    with frame_progress(args, total) as streamer:
        output = model.generate(
            **inputs.to(device), **generation_kwargs(args, max_frames, device), **extra, return_dict_in_generate=True,
            streamer=streamer,
        )
    num_frames = int(output.audio_lengths[0])
    logger.info("generated %d frames in %.1f s", num_frames, elapsed(start))

    with phase("decoding audio", args):
        waveform = decode_audio(model, output.sequences[:1, :num_frames])
    waveform = fit_to_pcm(waveform, args.output, args.normalize)
    sampling_rate = model.config.sampling_rate
    sf.write(args.output, waveform, sampling_rate, subtype="PCM_16")
    logger.info("wrote %s: %.2f s of audio at %d Hz", args.output, len(waveform) / sampling_rate, sampling_rate)
    if num_frames == 0:
        logger.warning("the model stopped before its first audio frame: the WAV file is empty")

    text_ids = output.text_sequences[:1, : int(output.text_lengths[0])]
    print(processor.batch_decode(text_ids, skip_special_tokens=True)[0].strip())
    return 0


def run_speak(args) -> int:
    if not args.text.strip():
        args.parser.error("the text to speak is empty")
    return run_answer(args)


def check_answer_args(args):
    """Check everything the user gave before a model loads (that can take minutes); usage errors exit with 2.
    -> (voice transcript, device, dtype, max frames or None for the model's default)."""
    parser = args.parser
    voice_text = read_voice_text(args, parser)
    question = getattr(args, "question", None)
    question_seconds = check_audio_file(parser, question, "question") if question is not None else 0.0
    voice_seconds = check_audio_file(parser, args.voice, "reference voice")
    check_output_path(parser, args.output)
    if args.model is not None:
        args.model = check_model_name(parser, args.model)
    device, dtype = resolve_device_and_dtype(args, parser)
    if args.quantize is not None:
        try:
            check_quantization_mode(args.quantize, device, dtype)
        except (ValueError, ImportError) as error:
            parser.error(f"--quantize {args.quantize}: {error}")
    max_frames = args.max_frames
    if max_frames is None and args.model is None:
        max_frames = TINY_DEFAULT_MAX_FRAMES
    if args.do_sample is not True and any(v is not None for v in (args.temperature, args.top_k, args.top_p)):
        logger.warning("--temperature/--top-k/--top-p only apply with --do-sample")
    logger.info("question %s (%.1f s), voice %s (%.1f s)", question, question_seconds, args.voice, voice_seconds)
    return voice_text, device, dtype, max_frames


def read_voice_text(args, parser) -> str:
    if args.voice_text_file is not None:
        if not os.path.isfile(args.voice_text_file):
            parser.error(f"voice transcript file not found: {args.voice_text_file}")
        try:
            with open(args.voice_text_file, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"cannot read the voice transcript file {args.voice_text_file}: {error}")
    elif args.voice_text is not None:
        text = args.voice_text
    else:
        parser.error("--voice needs its transcript: give --voice-text TEXT or --voice-text-file FILE")
    text = " ".join(text.split())
    if not text:
        parser.error("the voice transcript is empty")
    return text


def check_audio_file(parser, path: str, what: str) -> float:
    """Exit with status 2 unless `path` is a readable, non-empty audio file; returns its duration in seconds."""
    if not os.path.isfile(path):
        parser.error(f"{what} file not found: {path}")
    try:
        info = sf.info(path)
        frames, rate = info.frames, info.samplerate
    except Exception as soundfile_error:  # not a libsndfile format: the processor falls back to librosa too
        try:
            import librosa

            frames, rate = librosa.get_duration(path=path), 1
        except Exception:
            parser.error(f"cannot read the {what} file {path} as audio: {soundfile_error}")
    if frames <= 0:
        parser.error(f"the {what} file {path} holds no audio")
    return frames / rate


def check_output_path(parser, path: str) -> None:
    if not path.lower().endswith(".wav"):
        parser.error(f"the output must be a .wav file, got {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"the output folder does not exist: {folder}")
    if os.path.isdir(path):
        parser.error(f"the output is a folder: {path}")


def check_model_name(parser, name: str) -> str:
    """A local folder must exist; anything else that looks like a path is an error, not a hub id."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        parser.error(f"--model must be a folder or a hub id, got the file {name}")
    if os.path.isabs(path) or name.startswith((".", "~")) or name.count("/") > 1:
        parser.error(f"model folder not found: {name}")
    return name  # a hub id such as "owner/name"


def resolve_device_and_dtype(args, parser):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    return device, getattr(torch, dtype_name)


def load_model(name, device, dtype, trust_remote_code, quantize=None):
    """-> (model in eval mode on `device`, processor). `name=None` builds the tiny random model. `quantize`: a mode
    of `openchroma.quantization.MODES` (quantized while transformers loads the weights)."""
    import openchroma  # noqa: F401  (registers Chroma with the Auto classes: a folder without remote code loads too)

    if name is None:
        from ..testing import build_tiny_model, build_tiny_processor

        model = build_tiny_model(TINY_MODEL_SEED)  # the same weights every run
        if quantize is not None:
            return load_quantized(model, quantize, device, dtype), build_tiny_processor()
        return model.to(device=device, dtype=dtype).eval(), build_tiny_processor()

    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    if quantize is not None:
        return load_quantized(name, quantize, device, dtype, trust_remote_code=trust_remote_code), processor
    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, dtype=dtype)
    return model.to(device).eval(), processor


def generation_kwargs(args, max_frames, device) -> dict:
    """The sampling options the user set (the model's generation config supplies the rest)."""
    kwargs = {"max_new_tokens": max_frames, "do_sample": args.do_sample, "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p}
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    if args.seed is not None:
        torch.manual_seed(args.seed)
        kwargs["generator"] = torch.Generator(device=device).manual_seed(args.seed)
    return kwargs


@torch.no_grad()
def decode_audio(model, codes: torch.Tensor) -> np.ndarray:
    """Audio codes [1, T, K] -> float32 waveform [T * samples_per_frame] at the codec's rate (24 kHz)."""
    if codes.shape[1] == 0:
        return np.zeros(0, dtype=np.float32)
    codes = codes.clamp(0, model.config.codec_config.codebook_size - 1)  # Mimi decodes real codes only
    audio = model.codec_model.decode(codes.permute(0, 2, 1)).audio_values  # [1, 1, T * 1920]
    return audio[0, 0].float().cpu().numpy()


def fit_to_pcm(waveform: np.ndarray, path: str, normalize: bool) -> np.ndarray:
    """16-bit PCM holds [-1, 1]: scale to NORMALIZE_PEAK with --normalize, else clip and warn when samples clip."""
    peak = float(np.abs(waveform).max()) if waveform.size else 0.0
    if normalize and peak > 0:
        logger.info("normalized the answer: peak %.3f -> %.2f", peak, NORMALIZE_PEAK)
        return waveform * (NORMALIZE_PEAK / peak)
    clipped = int(np.count_nonzero(np.abs(waveform) > 1.0))
    if clipped:
        logger.warning("%s: %.1f %% of the samples (peak %.2f) are beyond full scale and clipped; --normalize scales "
                       "the answer to fit", path, 100 * clipped / waveform.size, peak)
    return np.clip(waveform, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------------------------


class FrameProgress:
    """A `generate(streamer=...)` receiver that advances a tqdm bar by the frames of every chunk."""

    def __init__(self, bar):
        self.bar = bar

    def put(self, chunk) -> None:
        self.bar.update(int(chunk.audio_valid[0].sum()))

    def end(self) -> None:
        self.bar.refresh()


@contextlib.contextmanager
def frame_progress(args, total: int):
    """-> a streamer for `generate` showing a per-frame bar on a terminal (see `show_progress`), else None."""
    if not show_progress(args):
        yield None
        return
    bar = tqdm(total=total, desc="generating", unit="frame", file=sys.stderr, leave=False)
    try:
        with logging_redirect_tqdm(loggers=[logger, logging.getLogger("transformers")]):
            yield FrameProgress(bar)
    finally:
        bar.close()


def show_progress(args) -> bool:
    """Progress bars only on a terminal (never in log files), with tqdm installed, without --no-progress/--quiet."""
    return tqdm is not None and not args.no_progress and not args.quiet and sys.stderr.isatty()


@contextlib.contextmanager
def phase(description: str, args, spinner: bool = True):
    """Show `description` with a spinner and the elapsed time on stderr while the block runs (see `show_progress`).

    For the phases without a frame count (loading, reading audio, decoding); generation has its per-frame bar
    (`frame_progress`). Log records emitted meanwhile are written above the spinner instead of through it.
    """
    if not (spinner and show_progress(args)):
        yield
        return
    bar = tqdm(desc=description, bar_format="{desc} {elapsed}", file=sys.stderr, leave=False)
    stop = threading.Event()

    def spin():
        for symbol in itertools.cycle("|/-\\"):
            if stop.wait(SPINNER_INTERVAL_S):
                break
            bar.set_description_str(f"{description} {symbol}")  # also redraws, which advances the elapsed time

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        with logging_redirect_tqdm(loggers=[logger, logging.getLogger("transformers")]):
            yield
    finally:
        stop.set()
        thread.join()
        bar.close()


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """Hide transformers' and huggingface_hub's progress bars (downloads, "Loading weights") while ours are off;
    never turns them on against the user's settings (HF_HUB_DISABLE_PROGRESS_BARS)."""
    from transformers.utils import logging as transformers_logging

    turn_off = not enabled and transformers_logging.is_progress_bar_enabled()
    if turn_off:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if turn_off:
            transformers_logging.enable_progress_bar()


def elapsed(start: float) -> float:
    return time.perf_counter() - start
