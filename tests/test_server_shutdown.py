"""SIGTERM on `python -m openchroma.serving` (a real process, tiny model): it stops accepting connections, lets the
answers in flight finish during --drain-seconds, then ends the ones still running with an error event and [DONE]."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_stream(url, body, events, first):
    """SSE events of one chat stream into `events` (parsed JSON, or "[DONE]"); `first` is set at the first audio."""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if '"audio"' in payload:
                first.set()


def test_sigterm_drains_then_ends_streams_with_an_error(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "openchroma.serving", "--port", str(port), "--torch-threads", "1",
               "--voices-dir", str(tmp_path), "--register-voice", "default", str(EXAMPLES / "voice.wav"),
               str(EXAMPLES / "voice.txt"), "--drain-seconds", "4", "--max-frames", "5000", "--log-level", "warning"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=2).json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)

        def chat(frames):
            return {"messages": [{"role": "user", "content": "Hello"}], "modalities": ["text", "audio"],
                    "audio": {"voice": "default", "format": "pcm16"}, "stream": True, "max_audio_frames": frames}

        streams = {}
        for name, frames in (("long", 5000), ("short", 30)):
            events, first = [], threading.Event()
            thread = threading.Thread(target=read_stream, args=(url, chat(frames), events, first))
            thread.start()
            streams[name] = (events, first, thread)
            assert first.wait(60), f"the {name} answer did not start"

        server.send_signal(signal.SIGTERM)
        refused = False
        deadline = time.time() + 30
        while not refused and time.time() < deadline:  # new connections are refused once it drains
            try:
                httpx.get(url + "/health", timeout=2)
                time.sleep(0.1)
            except httpx.ConnectError:
                refused = True
        for events, _, thread in streams.values():
            thread.join(60)
        assert server.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    assert refused
    short, long = streams["short"][0], streams["long"][0]
    assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"  # finished in the drain
    assert long[-1] == "[DONE]" and "error" in long[-2], long[-2:]  # cut by the drain's end: told so
    assert "shutting down" in long[-2]["error"]["message"]
