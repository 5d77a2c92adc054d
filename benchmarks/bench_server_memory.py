# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""The server's peak memory for the largest requests its limits allow, and for the hostile requests of issue 12.

    python benchmarks/bench_server_memory.py --sizes tiny mid
    python benchmarks/bench_server_memory.py --sizes mid --max-prompt-tokens 4096   # a lower limit (slow CPUs)

Each size runs `create_app` under uvicorn in its own process (random weights: tiny = the tests' tiny model, mid =
bench_decode.py's mid size: the real backbone, depth decoder and Mimi, the thinker cut to 2 text and 2 audio-encoder
layers; the tiny tokenizer). The server keeps its default limits (ServerSettings(), --max-prompt-tokens aside). This
script sends the requests one after another and reads the server's peak RSS (VmHWM) after each: peaks only grow,
so each row shows the peak so far, and the growth a request caused. The largest requests are streamed with the
most frames allowed and cancelled after their first audio (the caches for all those frames are allocated when the
request starts). Results are appended to benchmarks/RESULTS.md.
"""

import argparse
import base64
import datetime
import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


# ----------------------------------------------------------------------------------------------------------------------
# The server process
# ----------------------------------------------------------------------------------------------------------------------


def serve(size: str, port: int, max_prompt_tokens, threads: int):
    import torch
    import uvicorn

    from openchroma.serving.app import ChromaEngine, ServerSettings, VoiceStore, create_app, register_voice_file
    from openchroma.serving.http import uvicorn_config
    from openchroma.testing import build_tiny_model, build_tiny_processor

    torch.set_num_threads(threads)
    if size == "tiny":
        model = build_tiny_model()
    else:
        from bench_decode import build_model

        model = build_model(size, "cpu", torch.float32)
    processor = build_tiny_processor()
    if size != "tiny":  # random weights, the tiny tokenizer: its <|AUDIO|> id stands in for the real one
        model.thinker.config.audio_token_id = processor.audio_token_id
    settings = ServerSettings(model_name="bench", max_prompt_tokens=max_prompt_tokens)
    voices = VoiceStore()
    register_voice_file(model, processor, voices, "default", str(ROOT / "examples" / "voice.wav"),
                        str(ROOT / "examples" / "voice.txt"))
    app = create_app(ChromaEngine(model, processor), settings, voices)
    uvicorn.Server(uvicorn_config(app, settings, port=port, log_level="warning")).run()


# ----------------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------------


def wav_b64(seconds: float, rate: int = 16000) -> str:
    import soundfile as sf

    buffer = io.BytesIO()
    wave = 0.1 * np.sin(np.arange(int(seconds * rate)) * 0.05).astype(np.float32)
    sf.write(buffer, wave, rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def flac_b64(seconds: int, rate: int, channels: int) -> str:
    import soundfile as sf

    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", rate, channels, format="FLAC", subtype="PCM_16") as file:
        for _ in range(seconds):
            file.write(np.zeros((rate, channels), dtype=np.int16))
    return base64.b64encode(buffer.getvalue()).decode()


def words(tokens: int) -> str:
    """Text of at most `tokens` prompt tokens (the tiny tokenizer, which both sizes use)."""
    from openchroma.testing import build_tiny_processor

    tokenizer = build_tiny_processor().tokenizer
    per_word = len(tokenizer("ab " * 1000, add_special_tokens=False).input_ids) / 1000
    count = int(tokens / per_word)
    while len(tokenizer("ab " * count, add_special_tokens=False).input_ids) > tokens:
        count -= max(1, count // 200)
    return "ab " * count


def chat_body(content, frames=None, stream=False):
    body = {"model": "bench", "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "pcm16"},
            "messages": [{"role": "user", "content": content}], "stream": stream}
    if frames:
        body["max_audio_frames"] = frames
    return body


def cases(limits: dict):
    """(name, path, body, stream-and-cancel) in the order they are sent."""
    prompt = limits["max_prompt_tokens"]
    clip_seconds = limits["max_total_audio_seconds"] / limits["max_audio_parts"]
    audio_tokens = int(limits["max_total_audio_seconds"] * 25)
    clips = [{"type": "input_audio", "input_audio": {"data": wav_b64(clip_seconds), "format": "wav"}}
             for _ in range(limits["max_audio_parts"])]
    return [
        ("ordinary chat (3 s question, 20 frames)", "/v1/chat/completions", chat_body(
            [{"type": "text", "text": "Hi"}, {"type": "input_audio", "input_audio": {"data": wav_b64(3), "format": "wav"}}],
            20), False),
        (f"largest text prompt (~{prompt - 100} tokens), {limits['max_frames']} frames",
         "/v1/chat/completions", chat_body(words(prompt - 100), limits["max_frames"], stream=True), True),
        (f"largest audio: {limits['max_audio_parts']} clips of {clip_seconds:g} s + text to the token limit",
         "/v1/chat/completions", chat_body([{"type": "text", "text": words(prompt - audio_tokens - 100)}, *clips],
                                           limits["max_frames"], stream=True), True),
        ("largest speech: 4096-character input and instructions", "/v1/audio/speech",
         {"model": "bench", "voice": "default", "input": "ab " * 1365, "instructions": "ab " * 1365,
          "response_format": "pcm", "stream_format": "sse", "max_audio_frames": limits["max_frames"]}, True),
        ("hostile: 10,000 short messages", "/v1/chat/completions",
         dict(chat_body("x"), messages=[{"role": "user", "content": "hi"}] * 10000), False),
        ("hostile: 20,000 characters of speech instructions", "/v1/audio/speech",
         {"model": "bench", "voice": "default", "input": "Hello", "instructions": "x" * 20000}, False),
        ("hostile: 10 FLAC clips of 59 s", "/v1/chat/completions",
         chat_body([{"type": "input_audio", "input_audio": {"data": flac_b64(59, 16000, 1), "format": "wav"}}] * 10),
         False),
        ("hostile: FLAC of 59 s, 8 channels at 655 kHz", "/v1/chat/completions",
         chat_body([{"type": "input_audio", "input_audio": {"data": flac_b64(59, 655350, 8), "format": "wav"}}]),
         False),
        ("hostile: NUL byte in prompt_audio", "/v1/chat/completions",
         dict(chat_body("hi"), prompt_audio="a\x00b.wav", prompt_text="x"), False),
    ]


def send(url, path, body, stream_and_cancel):
    import httpx

    if not stream_and_cancel:
        response = httpx.post(url + path, json=body, timeout=3600)
        if response.status_code != 200:
            print("   ", response.json()["error"]["message"][:150], flush=True)
        return response.status_code
    with httpx.stream("POST", url + path, json=body, timeout=3600) as response:
        if response.status_code != 200:
            print("   ", response.read()[:150], flush=True)
        for line in response.iter_lines():
            if '"audio"' in line or "speech.audio.delta" in line:
                break  # first audio: the request's caches are allocated; hang up (the server cancels it)
        return response.status_code


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def measure(size: str, max_prompt_tokens, threads: int, largest_only: bool = False) -> list:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, __file__, "--serve", size, "--port", str(port), "--threads", str(threads)]
    if max_prompt_tokens:
        command += ["--max-prompt-tokens", str(max_prompt_tokens)]
    server = subprocess.Popen(command)
    try:
        while True:
            try:
                httpx.get(url + "/health", timeout=5).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(1)
        from openchroma.serving.schemas import ServerSettings

        settings = ServerSettings(max_prompt_tokens=max_prompt_tokens)
        limits = {"max_prompt_tokens": max_prompt_tokens or prompt_limit(size, settings),
                  "max_total_audio_seconds": settings.max_total_audio_seconds,
                  "max_audio_parts": settings.max_audio_parts, "max_frames": settings.max_frames}
        rows, previous = [("idle, after start", "", round(peak_rss_mb(server.pid)), 0, "")], peak_rss_mb(server.pid)
        for name, path, body, streamed in cases(limits)[: 3 if largest_only else None]:
            start = time.perf_counter()
            status = send(url, path, body, streamed)
            while streamed and httpx.get(url + "/health").json()["active_rows"]:
                time.sleep(0.2)  # the cancelled request has left the batch
            peak = peak_rss_mb(server.pid)
            rows.append((name, status, round(peak), round(peak - previous), f"{time.perf_counter() - start:.1f}"))
            previous = peak
            print(rows[-1], flush=True)
        if largest_only:
            return rows
        # one long prompt beside ordinary concurrent requests: they are not padded to its length
        with ThreadPoolExecutor(9) as pool:
            start = time.perf_counter()
            futures = [pool.submit(send, url, "/v1/chat/completions",
                                   chat_body(words(limits["max_prompt_tokens"] - 100), 40, stream=True), True)]
            futures += [pool.submit(send, url, "/v1/chat/completions", chat_body("Hello.", 20), False)
                        for _ in range(8)]
            statuses = sorted({f.result() for f in futures})
        peak = peak_rss_mb(server.pid)
        rows.append(("largest text prompt + 8 ordinary requests at once", "/".join(map(str, statuses)), round(peak),
                     round(peak - previous), f"{time.perf_counter() - start:.1f}"))
        print(rows[-1], flush=True)
        return rows
    finally:
        server.terminate()
        server.wait(60)


def prompt_limit(size, settings) -> int:
    from openchroma.serving.app import thinker_prompt_limit

    class Model:  # the limit depends on the config only
        pass

    model = Model()
    if size == "tiny":
        from openchroma.testing import build_tiny_config

        model.config = build_tiny_config()
    else:
        from bench_decode import build_config

        model.config = build_config(size)
    return thinker_prompt_limit(model, settings)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--max-prompt-tokens", type=int, help="lower the server's prompt limit (default: its own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--largest-only", action="store_true",
                        help="only the ordinary request and the two largest chat requests (slow sizes)")
    parser.add_argument("--serve", choices=["tiny", "mid"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.port, args.max_prompt_tokens, args.threads)
    import torch
    from results_file import RESULTS, append_section

    lines = [f"## {datetime.date.today()} · server peak memory under its limits (CPU, torch {torch.__version__}, "
             f"{args.threads} thread(s), {os.cpu_count()} cores)", "",
             "Peak RSS (VmHWM) of the server process after each request, in order; default limits"
             + (f", --max-prompt-tokens {args.max_prompt_tokens}" if args.max_prompt_tokens else "")
             + ". Streamed requests are cancelled at their first audio.", ""]
    for size in args.sizes:
        rows = measure(size, args.max_prompt_tokens, args.threads, args.largest_only)
        lines += [f"**{size}**", "", "| request | status | peak RSS (MB) | growth (MB) | seconds |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {status} | {peak} | {growth} | {seconds} |" for name, status, peak, growth, seconds in rows]
        lines.append("")
    if args.no_save:
        print("\n".join(lines))
    else:
        append_section(RESULTS, lines)


if __name__ == "__main__":
    main()
