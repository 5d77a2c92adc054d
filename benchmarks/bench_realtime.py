# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Realtime latency: end of user speech (the server VAD's `speech_stopped`) -> first `response.output_audio.delta`
on the socket, measured by a client that streams examples/question.wav in real time (20 ms chunks), alone and with
N other sessions talking at the same time (each streaming the question in a loop and getting answers).

Compared with the library's own time to first chunk for the same conversation (processor + `model.stream` until its
first 2-frame chunk, alone), so the table shows what the socket, the VAD and the shared engine add.

    python benchmarks/bench_realtime.py --sizes tiny --others 0 8 --turns 5 --threads 1
    python benchmarks/bench_realtime.py --sizes mid --others 0 --turns 3 --threads 2 --frames 4

Sizes: tiny = ChromaConfig.tiny(); mid = the real backbone (16 x 2048), depth decoder and Mimi with a 2-layer
thinker and the tiny tokenizer's special ids (random weights). Appends a section to benchmarks/RESULTS.md.
"""

import argparse
import base64
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import RESULTS, append_section  # noqa: E402

RATE = 24000
CHUNK = 480  # 20 ms


def build(size: str):
    from openchroma import ChromaConfig, ChromaForConditionalGeneration
    from openchroma.testing import build_tiny_model, build_tiny_processor

    if size == "tiny":
        return build_tiny_model(), build_tiny_processor()
    real = json.loads((ROOT / "tests" / "fixtures" / "config_real.json").read_text())
    thinker = real["thinker_config"]
    thinker["text_config"].update(num_hidden_layers=2, layer_types=["full_attention"] * 2)
    thinker["audio_config"].update(encoder_layers=2, num_hidden_layers=2)
    tiny = ChromaConfig.tiny()  # the tiny tokenizer's special ids (all valid rows of the real vocabulary)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "audio_token_index", "audio_start_token_id",
                 "audio_end_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index",
                 "video_token_index"):
        thinker[name] = getattr(tiny.thinker_config, name)
    for name in ("text_start_token_id", "text_end_token_id", "im_end_token_id"):
        real[name] = getattr(tiny, name)
    config = ChromaConfig(**real)
    config.codebook_eos_token_id = -1  # never stop early: every answer has the same length
    return ChromaForConditionalGeneration(config).eval(), build_tiny_processor()


def question_pcm(before_s=0.3, after_s=1.0) -> np.ndarray:
    from openchroma.processing_chroma import load_audio

    wave = load_audio(str(ROOT / "examples" / "question.wav"), RATE)
    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2")
    silence = np.zeros(int(after_s * RATE), "<i2")
    return np.concatenate([np.zeros(int(before_s * RATE), "<i2"), pcm, silence])


def library_first_chunk(model, processor, voice, frames: int, repeats: int = 3) -> float:
    """Seconds from the processor call to the first streamed chunk for the question, as the server's conversation
    holds it (its default system prompt), alone: median of `repeats` runs after a warm-up run."""
    from openchroma.serving.realtime.config import DEFAULT_INSTRUCTIONS

    wave = question_pcm(0.3, 0.5).astype(np.float32) / 32768
    conversation = [{"role": "system", "content": DEFAULT_INSTRUCTIONS},
                    {"role": "user", "content": [{"type": "audio", "audio": (wave, RATE)}]}]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        inputs = processor(conversation)
        stream = model.stream(**inputs, voice=voice, max_new_tokens=frames, chunk_frames=(2,))
        next(stream)
        times.append(time.perf_counter() - start)
        stream.close()
    return statistics.median(times[1:])


class Talker(threading.Thread):
    """One realtime session streaming the question in real time, turn after turn; records, per turn, the time from
    receiving speech_stopped to receiving the first audio delta."""

    def __init__(self, url, frames, turns, stop_event, offset_s=0.0):
        super().__init__(daemon=True)
        self.url, self.frames, self.turns, self.stop_event, self.offset_s = url, frames, turns, stop_event, offset_s
        self.latencies, self.failure = [], None

    def run(self):
        from websockets.sync.client import connect

        try:
            with connect(self.url, max_size=None) as ws:
                ws.recv()  # session.created
                ws.send(json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "max_output_tokens": self.frames,
                    "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}}}))
                time.sleep(self.offset_s)
                turn = 0
                while not self.stop_event.is_set() and (self.turns is None or turn < self.turns):
                    self.talk(ws)
                    turn += 1
        except Exception as error:  # reported by the caller
            self.failure = error

    def talk(self, ws):
        stopped, first, done = [], [], threading.Event()

        def listen():
            while not done.is_set():
                event = json.loads(ws.recv())
                now = time.perf_counter()
                if event["type"] == "input_audio_buffer.speech_stopped":
                    stopped.append(now)
                elif event["type"] == "response.output_audio.delta" and not first:
                    first.append(now)
                elif event["type"] == "response.done":
                    done.set()

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        pcm, start = question_pcm(), time.perf_counter()
        for i in range(0, len(pcm), CHUNK):
            wait = start + i / RATE - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            ws.send(json.dumps({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(pcm[i:i + CHUNK].tobytes()).decode()}))
        done.wait(timeout=600)
        listener.join(timeout=600)
        if stopped and first:
            self.latencies.append(first[0] - stopped[0])


def run_size(size: str, others_list, turns: int, frames: int):
    import uvicorn

    from openchroma.serving.app import ChromaEngine, ServerSettings, VoiceStore, create_app, register_voice_file
    from openchroma.serving.realtime import RealtimeSettings

    model, processor = build(size)
    voices = VoiceStore()
    register_voice_file(model, processor, voices, "default", ROOT / "examples" / "voice.wav",
                        ROOT / "examples" / "voice.txt")
    library = library_first_chunk(model, processor, voices.get("default"), frames)
    settings = ServerSettings(model_name="bench", default_voice="default", default_max_frames=frames)
    app = create_app(ChromaEngine(model, processor, batch_window_s=0.0), settings, voices)
    app.state.realtime = RealtimeSettings(max_sessions=64)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"ws://127.0.0.1:{port}/v1/realtime?model=bench"
    rows = []
    for others in others_list:
        stop = threading.Event()
        background = [Talker(url, frames, None, stop, offset_s=0.37 * i) for i in range(others)]
        for talker in background:
            talker.start()
        time.sleep(1.0 if others else 0.0)
        measured = Talker(url, frames, turns, stop)
        measured.run()
        stop.set()
        for talker in background:
            talker.join(timeout=120)
        failures = [t.failure for t in [measured] + background if t.failure]
        if failures or not measured.latencies:
            raise RuntimeError(f"{size} with {others} others failed: {failures or 'no latency measured'}")
        rows.append((size, others, measured.latencies, library))
    server.should_exit = True
    thread.join(timeout=30)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny"], choices=["tiny", "mid"])
    parser.add_argument("--others", nargs="*", type=int, default=[0, 8], help="other sessions talking meanwhile")
    parser.add_argument("--turns", type=int, default=5, help="measured turns per setting")
    parser.add_argument("--frames", type=int, default=25, help="audio frames per answer (80 ms each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        rows += run_size(size, args.others, args.turns, args.frames)
    lines = ["", f"## {time.strftime('%Y-%m-%d')} · realtime socket latency (CPU, torch {torch.__version__}, "
             f"{args.threads} thread(s))", "",
             f"VAD stop (`speech_stopped` received) -> first `response.output_audio.delta` received, per turn; "
             f"examples/question.wav streamed in real time in 20 ms chunks, server VAD with 500 ms silence; "
             f"answers of {args.frames} frames; `others` sessions talk at the same time. The user's actual end of "
             "speech is the silence window (500 ms) earlier. Library: processor + `model.stream` to its first "
             "chunk, alone.", "",
             "| size | other sessions | turns | VAD stop -> first audio, median (ms) | worst (ms) | "
             "library first chunk (ms) | overhead, median (ms) |", "|---|---|---|---|---|---|---|"]
    for size, others, latencies, library in rows:
        median = statistics.median(latencies)
        lines.append(f"| {size} | {others} | {len(latencies)} | {median * 1000:.0f} | {max(latencies) * 1000:.0f} | "
                     f"{library * 1000:.0f} | {(median - library) * 1000:.0f} |")
    lines.append("")
    if args.no_write:
        print("\n".join(lines))
    else:
        append_section(RESULTS, lines)


if __name__ == "__main__":
    main()
