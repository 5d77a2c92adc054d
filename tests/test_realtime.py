"""The Realtime WebSocket (/v1/realtime): the official `openai` SDK's realtime client (and raw `websockets` for
malformed input) against a real uvicorn server with the tiny random model.

Answers are compared with the library (`model.stream` with the same conversation, voice and seed), never with the
server itself. The tiny model's audio is noise and its text gibberish: the checks are about turn taking, equality
with the library, cancellation, truncation and errors.
"""

import base64
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("silero_vad")
websockets_sync = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed  # noqa: E402
httpx = pytest.importorskip("httpx")

from openchroma.processing_chroma import load_audio  # noqa: E402
from openchroma.serving.app import ChromaEngine, ServerSettings, VoiceStore, create_app, register_voice_file  # noqa: E402
from test_server import Server  # noqa: E402  (uvicorn in a thread, configured as `openchroma serve` does)
from openchroma.serving.realtime import RealtimeSettings  # noqa: E402
from openchroma.testing import build_tiny_model, build_tiny_processor  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sdk_realtime = pytest.mark.skipif(not hasattr(openai.OpenAI, "realtime"),
                                  reason="this openai release has no GA realtime client (client.realtime)")
MODEL = "chroma-tiny"
RATE = 24000
INSTRUCTIONS = "You are a helpful voice assistant."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, processor = build_tiny_model(), build_tiny_processor()
    voices = VoiceStore(tmp_path_factory.mktemp("voices"))
    register_voice_file(model, processor, voices, "default", EXAMPLES / "voice.wav", EXAMPLES / "voice.txt")
    settings = ServerSettings(model_name=MODEL, default_voice="default", default_max_frames=8, max_frames=600)
    engine = ChromaEngine(model, processor, batch_window_s=0.0)
    app = create_app(engine, settings, voices)
    app.state.realtime = RealtimeSettings(max_sessions=4)
    with Server(app) as running:
        running.model, running.processor, running.voices = model, processor, voices
        yield running
    torch.set_num_threads(threads)


def question(before_s=0.5, after_s=1.2) -> np.ndarray:
    """examples/question.wav as PCM16 24 kHz, with silence around it."""
    wave = load_audio(str(EXAMPLES / "question.wav"), RATE)
    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2")
    return np.concatenate([np.zeros(int(before_s * RATE), "<i2"), pcm, np.zeros(int(after_s * RATE), "<i2")])


def chunks(pcm: np.ndarray, sizes_ms=(20, 40, 100, 60)):
    """base64 pieces of 20-100 ms (cycling through sizes_ms)."""
    start, i = 0, 0
    while start < len(pcm):
        size = sizes_ms[i % len(sizes_ms)] * RATE // 1000
        yield base64.b64encode(pcm[start:start + size].tobytes()).decode()
        start, i = start + size, i + 1


def session(voice="default", **extra):
    return {"type": "realtime", "instructions": INSTRUCTIONS, "output_modalities": ["audio"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                                   "silence_duration_ms": 500}},
                      "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": voice}}, **extra}


def receive_until(connection, wanted: str, seen: list, timeout=120):
    """Events (as dicts) until one of type `wanted` arrives; every event is appended to `seen`."""
    deadline = time.time() + timeout
    while True:
        assert time.time() < deadline, f"no {wanted} event (saw {[e['type'] for e in seen]})"
        event = json.loads(connection.recv_bytes())
        seen.append(event)
        if event["type"] == wanted:
            return event


class Answer:
    """One response's transcript and PCM collected from its events."""

    def __init__(self, events, response_id):
        mine = [e for e in events if e.get("response_id") == response_id]
        self.transcript = "".join(e["delta"] for e in mine if e["type"] == "response.output_audio_transcript.delta")
        self.pcm = b"".join(base64.b64decode(e["delta"]) for e in mine if e["type"] == "response.output_audio.delta")
        self.deltas = [e for e in mine if e["type"] in ("response.output_audio.delta",
                                                        "response.output_audio_transcript.delta")]


def library_answer(server, conversation, max_frames, **sampling):
    """What the library streams for the same conversation and voice: (text ids per chunk, pcm per chunk)."""
    inputs = server.processor(conversation)
    chunks_ = list(server.model.stream(**inputs, voice=server.voices.get("default"), max_new_tokens=max_frames,
                                       chunk_frames=(2,), **sampling))
    return [c.text_ids[0].tolist() for c in chunks_], [c.pcm[0].numpy() for c in chunks_]


def as_pcm16(pieces) -> bytes:
    return (np.clip(np.concatenate(pieces), -1, 1) * 32767).astype("<i2").tobytes()


def user_audio(pcm: np.ndarray, started: dict, stopped: dict) -> dict:
    """The user message the server built from the committed buffer (24 kHz float, as the server decodes it)."""
    piece = pcm[started["audio_start_ms"] * 24:stopped["audio_end_ms"] * 24].astype(np.float32) / 32768.0
    return {"role": "user", "content": [{"type": "audio", "audio": (piece, RATE)}]}


# ----------------------------------------------------------------------------------------------------------------------


@sdk_realtime
def test_server_vad_turn_equals_the_library(server):
    """question.wav appended in 20-100 ms chunks: VAD start/stop, one committed user item, and a seeded answer whose
    transcript and PCM are exactly what `model.stream` gives for the same conversation."""
    pcm = question()
    events = []
    with server.client().realtime.connect(model=MODEL) as connection:
        assert json.loads(connection.recv_bytes())["type"] == "session.created"
        connection.session.update(session=session(max_output_tokens=6, temperature=0.8, top_p=0.9, seed=1234))
        receive_until(connection, "session.updated", events)
        for piece in chunks(pcm):
            connection.input_audio_buffer.append(audio=piece)
        done = receive_until(connection, "response.done", events)
    kinds = [e["type"] for e in events]
    started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_stopped") \
        < kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    assert started["item_id"] == stopped["item_id"]
    assert 0 < started["audio_start_ms"] < 500 < 2500 < stopped["audio_end_ms"] < 3700  # speech: 0.5 s .. 2.5 s
    assert done["response"]["status"] == "incomplete"  # the tiny model never ends on its own: 6 frames
    assert done["response"]["usage"]["output_token_details"]["audio_tokens"] == 6
    answer = Answer(events, done["response"]["id"])

    text_ids, audio = library_answer(
        server, [{"role": "system", "content": INSTRUCTIONS}, user_audio(pcm, started, stopped)], 6,
        do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    assert answer.pcm == as_pcm16(audio)
    assert answer.transcript == server.processor.decode(sum(text_ids, []), skip_special_tokens=True)
    assert done["response"]["output"][0]["content"][0]["transcript"] == answer.transcript
    assert answer.transcript and len(answer.pcm) == 6 * 1920 * 2  # something was said: text and 6 frames


@sdk_realtime
def test_barge_in_cancels_and_truncates_history(server):
    """Speech during an answer cancels it at once (no audio after speech_started); the client truncates the item
    to what it played; the next answer sees only the text that arrived with that audio (checked by running the
    next turn's conversation through the library)."""
    first, second = question(after_s=1.2), question(before_s=0.2, after_s=0.0)
    events = []
    with server.client().realtime.connect(model=MODEL) as connection:
        connection.session.update(session=session(max_output_tokens=400, temperature=0))
        receive_until(connection, "session.updated", events)
        for piece in chunks(first):
            connection.input_audio_buffer.append(audio=piece)
        receive_until(connection, "response.output_audio.delta", events)
        for piece in chunks(second):  # the user talks over the answer
            connection.input_audio_buffer.append(audio=piece)
        barge = receive_until(connection, "input_audio_buffer.speech_started", events)
        cancelled = receive_until(connection, "response.done", events)
        kinds = [e["type"] for e in events]
        after_barge = kinds[kinds.index("input_audio_buffer.speech_started", kinds.index("response.created")):]
        assert "response.output_audio.delta" not in after_barge  # nothing was sent once the user spoke
        assert cancelled["response"]["status"] == "cancelled"
        assert cancelled["response"]["status_details"]["reason"] == "turn_detected"
        answer = Answer(events, cancelled["response"]["id"])
        item_id = cancelled["response"]["output"][0]["id"]
        played_ms = len(answer.pcm) // 2 // 24 // 2  # the client played half of what it received
        connection.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=played_ms)
        assert receive_until(connection, "conversation.item.truncated", events)["audio_end_ms"] == played_ms
        for piece in chunks(np.zeros(int(1.2 * RATE), "<i2")):  # end of the second question
            connection.input_audio_buffer.append(audio=piece)
        done = receive_until(connection, "response.done", events)
    assert barge["audio_start_ms"] > 0
    speech = [e for e in events if e["type"].startswith("input_audio_buffer.speech_")]
    started1, stopped1, started2, stopped2 = speech
    assert started2 is barge
    stream = np.concatenate([first, second, np.zeros(int(1.2 * RATE), "<i2")])

    # the text of the cancelled answer that arrived with its first played_ms of audio
    text_ids, audio = library_answer(server, [{"role": "system", "content": INSTRUCTIONS},
                                              user_audio(stream, started1, stopped1)], 400)
    assert answer.pcm == as_pcm16(audio)[: len(answer.pcm)]
    kept, position = [], 0
    for ids, pcm in zip(text_ids, audio):
        if position < played_ms * 24:
            kept += ids
        position += len(pcm)
    spoken = server.processor.decode(kept, skip_special_tokens=True)
    assert spoken != server.processor.decode(sum(text_ids, []), skip_special_tokens=True)  # it was cut

    history = [{"role": "system", "content": INSTRUCTIONS}, user_audio(stream, started1, stopped1)]
    history += [{"role": "assistant", "content": spoken}] if spoken else []
    history += [user_audio(stream, started2, stopped2)]
    _, audio2 = library_answer(server, history, 400)
    assert Answer(events, done["response"]["id"]).pcm == as_pcm16(audio2)


@sdk_realtime
def test_cancel_frees_the_row(server):
    """response.cancel: response.done cancelled (client_cancelled) at once, no audio after it, the engine's row is
    freed; a second cancel is an error naming the event; the session keeps working."""
    events = []
    with server.client().realtime.connect(model=MODEL) as connection:
        connection.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}},
                                           "max_output_tokens": 500})
        receive_until(connection, "session.updated", events)
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Tell me a story."}]})
        connection.response.create()
        receive_until(connection, "response.output_audio.delta", events)
        connection.response.cancel()
        done = receive_until(connection, "response.done", events)
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "client_cancelled"
        connection.send({"type": "response.cancel", "event_id": "again"})
        error = receive_until(connection, "error", events)
        assert error["error"]["event_id"] == "again" and error["error"]["code"] == "response_cancel_not_active"
        deadline = time.time() + 20
        while server.health()["active_rows"]:
            assert time.time() < deadline, "the cancelled row stayed in the batch"
            time.sleep(0.05)
        connection.response.create(response={"max_output_tokens": 2})
        assert receive_until(connection, "response.done", events)["response"]["status"] == "incomplete"
    kinds = [e["type"] for e in events]
    cut = kinds.index("response.done")
    assert "response.output_audio.delta" not in kinds[cut:kinds.index("response.created", cut)]
    assert done["response"]["usage"]["output_token_details"]["audio_tokens"] < 500


@sdk_realtime
def test_disconnect_cancels_the_row(server):
    before = server.health().get("cancelled_total", 0)
    with server.client().realtime.connect(model=MODEL) as connection:
        connection.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}},
                                           "max_output_tokens": 500})
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Go on."}]})
        connection.response.create()
        receive_until(connection, "response.output_audio.delta", [])
    deadline = time.time() + 20
    while server.health()["active_rows"] or server.health().get("cancelled_total", 0) == before:
        assert time.time() < deadline, "the row of a closed socket stayed in the batch"
        time.sleep(0.05)


@sdk_realtime
def test_http_request_joins_the_realtime_batch(server):
    """A realtime answer and a chat completion decode in one batch (the engine's join counter moves)."""
    events = []
    with server.client().realtime.connect(model=MODEL) as connection:
        connection.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}},
                                           "max_output_tokens": 300})
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Hello!"}]})
        connection.response.create()
        receive_until(connection, "response.output_audio.delta", events)
        before = server.health().get("joined_running_total", 0)
        reply = server.client().chat.completions.create(
            model=MODEL, modalities=["text", "audio"], audio={"voice": "default", "format": "wav"},
            messages=[{"role": "user", "content": "Hi there."}], extra_body={"max_audio_frames": 4})
        assert reply.choices[0].message.audio.data
        assert server.health()["joined_running_total"] > before
        connection.response.cancel()
        receive_until(connection, "response.done", events)


BAD_EVENTS = [
    ("not json", "{oops", "invalid_json"),
    ("not an object", "[1, 2]", "invalid_event"),
    ("unknown type", {"type": "response.explode"}, "unknown_event"),
    ("bad base64", {"type": "input_audio_buffer.append", "audio": "%%%"}, "invalid_base64"),
    ("odd bytes", {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}, "invalid_value"),
    ("audio not a string", {"type": "input_audio_buffer.append", "audio": 5}, "invalid_value"),
    ("empty commit", {"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty"),
    ("unknown voice", {"type": "session.update", "session": {"type": "realtime",
                                                            "audio": {"output": {"voice": "nobody"}}}},
     "voice_not_found"),
    ("bad format", {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}},
     "unsupported_audio_format"),
    ("semantic vad", {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "semantic_vad"}}}}}, "unsupported_value"),
    ("unknown session field", {"type": "session.update", "session": {"colour": "blue"}}, "unknown_parameter"),
    ("threshold", {"type": "session.update", "session": {"turn_detection": {"threshold": 3}}}, "invalid_value"),
    ("tools", {"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}]}},
     "unsupported_value"),
    ("nothing to answer", {"type": "response.create"}, "empty_conversation"),
    ("item type", {"type": "conversation.item.create", "item": {"type": "function_call"}}, "unsupported_value"),
    ("item content", {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                                   "content": [{"type": "input_image"}]}},
     "unsupported_content"),
    ("truncate unknown", {"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0,
                          "audio_end_ms": 0}, "item_not_found"),
    ("cancel nothing", {"type": "response.cancel"}, "response_cancel_not_active"),
    ("max tokens", {"type": "response.create", "response": {"max_output_tokens": 10**6}}, "invalid_value"),
]


def test_bad_events_each_get_an_error_and_the_socket_stays_usable(server):
    url = server.url.replace("http", "ws") + f"/v1/realtime?model={MODEL}"
    with websockets_sync.connect(url) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        for i, (name, event, code) in enumerate(BAD_EVENTS):
            if isinstance(event, dict):
                event = json.dumps({**event, "event_id": f"bad_{i}"})
            ws.send(event)
            reply = json.loads(ws.recv(timeout=30))
            assert reply["type"] == "error", name
            if code is not None:
                assert reply["error"]["code"] == code, (name, reply)
            if event.startswith("{\""):
                assert reply["error"]["event_id"] == f"bad_{i}", name
            assert reply["error"]["message"], name
        ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Still here."}}))
        updated = json.loads(ws.recv(timeout=30))
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Still here."


def test_beta_dialect(server):
    """A preview-protocol client (OpenAI-Beta: realtime=v1, flat session.update) gets the beta event names."""
    url = server.url.replace("http", "ws") + f"/v1/realtime?model={MODEL}"
    with websockets_sync.connect(url, additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        created = json.loads(ws.recv())
        assert created["session"]["input_audio_format"] == "pcm16"
        ws.send(json.dumps({"type": "session.update", "session": {
            "modalities": ["text", "audio"], "voice": "alloy", "turn_detection": None,
            "input_audio_format": "pcm16", "temperature": 0.8, "max_response_output_tokens": 4}}))
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}}))
        ws.send(json.dumps({"type": "response.create"}))
        kinds = []
        while not kinds or kinds[-1] != "response.done":
            kinds.append(json.loads(ws.recv(timeout=60))["type"])
    assert "response.audio.delta" in kinds and "response.audio_transcript.done" in kinds
    assert not any(k.startswith("response.output_audio") or k == "conversation.item.added" for k in kinds)


def test_limits(server):
    url = server.url.replace("http", "ws") + f"/v1/realtime?model={MODEL}"
    limits = server.app.state.realtime
    try:
        server.app.state.realtime = RealtimeSettings(max_sessions=1, max_session_s=1.5, max_buffer_s=0.5)
        with websockets_sync.connect(url) as ws:
            assert json.loads(ws.recv())["type"] == "session.created"
            with websockets_sync.connect(url) as refused:  # one session per server
                error = json.loads(refused.recv(timeout=30))
                assert error["type"] == "error" and error["error"]["code"] == "session_limit_reached"
            ws.send(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
            assert json.loads(ws.recv(timeout=30))["type"] == "session.updated"
            second = base64.b64encode(np.zeros(int(0.4 * RATE), "<i2").tobytes()).decode()
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": second}))
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": second, "event_id": "too_much"}))
            error = json.loads(ws.recv(timeout=30))
            assert error["error"]["code"] == "input_audio_buffer_full" and error["error"]["event_id"] == "too_much"
            expired = json.loads(ws.recv(timeout=30))  # the session ends after 1.5 s
            assert expired["error"]["code"] == "session_expired"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=30)
        with websockets_sync.connect(url.replace(MODEL, "gpt-unknown")) as wrong:
            assert json.loads(wrong.recv(timeout=30))["error"]["code"] == "model_not_found"
    finally:
        server.app.state.realtime = limits


def test_page_is_served_and_loads_nothing_from_elsewhere(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text
    for name in ("app.js", "audio-worklet.js", "style.css"):
        response = httpx.get(f"{server.url}/static/{name}")
        assert response.status_code == 200
        assert not re.search(r"https?://|//cdn|@import", response.text), name
    assert not re.search(r"https?://", page.text)


def test_api_key(server):
    """With --api-key: refused without it; accepted as a Bearer header or (browsers) as a subprotocol."""
    from websockets.exceptions import InvalidStatus

    url = server.url.replace("http", "ws") + f"/v1/realtime?model={MODEL}"
    settings = server.app.state.settings
    settings.api_key = "sesame"
    try:
        with pytest.raises(InvalidStatus, match="403"):
            websockets_sync.connect(url, additional_headers={"Authorization": "Bearer wrong"})
        with websockets_sync.connect(url, additional_headers={"Authorization": "Bearer sesame"}) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        with websockets_sync.connect(url, subprotocols=["realtime", "openai-insecure-api-key.sesame"]) as ws:
            assert ws.subprotocol == "realtime"
            assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
    finally:
        settings.api_key = None
