"""The server under hostile input (issue 12): limits refused before the expensive work, 4xx (never 500) with the
offending `param`, URL fetching rules, HTTP hygiene, voice protection and the Chroma-SGLang drop-in.

Real HTTP on 127.0.0.1 with the tiny random model; every refusal is asserted by its status, code and param, and the
server is checked to keep serving. Outputs are compared with the library's own, never with the server itself.
"""

import base64
import http.server
import io
import logging
import socket
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
sf = pytest.importorskip("soundfile")

from test_server import FRAME_SAMPLES, Server, b64, decode_wav, wav_bytes  # noqa: E402

from openchroma.pipeline_chroma import SPEAK_REQUEST, SPEAK_SYSTEM_PROMPT  # noqa: E402
from openchroma.serving.app import ChromaEngine, ServerSettings, VoiceStore, create_app  # noqa: E402
from openchroma.serving.app import register_voice_file  # noqa: E402
from openchroma.testing import build_tiny_model, build_tiny_processor  # noqa: E402


MODEL = "chroma-tiny"
CHAT, SPEECH, VOICES = "/v1/chat/completions", "/v1/audio/speech", "/v1/audio/voices"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, processor = build_tiny_model(), build_tiny_processor()
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "clips").mkdir()
    (allowed / "clips" / "question.wav").write_bytes(wav_bytes(1.0, 200.0, rate=16000))
    voice_dir = tmp_path_factory.mktemp("operator")
    (voice_dir / "voice.wav").write_bytes(wav_bytes(1.0, 330.0))
    (voice_dir / "voice.txt").write_text("hello there my friend")
    settings = ServerSettings(
        model_name=MODEL, model_aliases=("chroma", "FlashLabs/Chroma-4B"), voices_dir=tmp_path_factory.mktemp("v"),
        default_max_frames=4, max_frames=600, max_audio_seconds=2.0, max_total_audio_seconds=3.0,
        max_audio_parts=3, max_messages=8, max_prompt_tokens=300, max_instructions_chars=100,
        max_body_bytes=1024 * 1024, body_timeout_s=1.0, header_timeout_s=1.0, allow_dirs=(str(allowed),),
        allow_url_fetch=True, url_fetch_timeout_s=1.5, max_input_chars=200, max_text_tokens=64,
    )
    voices = VoiceStore(settings.voices_dir)
    register_voice_file(model, processor, voices, "operator", str(voice_dir / "voice.wav"),
                        str(voice_dir / "voice.txt"))
    engine = ChromaEngine(model, processor, max_batch_size=16, batch_window_s=0.05, exact_audio=True)
    with Server(create_app(engine, settings, voices)) as running:
        running.settings, running.model, running.processor, running.allowed = settings, model, processor, allowed
        yield running
    torch.set_num_threads(threads)


def post(server, path, body, **kwargs):
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, timeout=60,
                          headers=kwargs.pop("headers", {"content-type": "application/json"}), **kwargs)
    return httpx.post(server.url + path, json=body, timeout=60, **kwargs)


def chat(**overrides):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_audio_frames": 2,
            "modalities": ["text", "audio"], "audio": {"voice": "operator", "format": "wav"}}
    body.update(overrides)
    return body


def audio_part(data: bytes, kind="input_audio"):
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}}
    return {"type": "audio", "audio": data if isinstance(data, str) else b64(data)}


def user(*parts):
    return [{"role": "user", "content": [{"type": "text", "text": "Listen."}, *parts]}]


def flac_bytes(seconds, rate, channels):
    """Silence as FLAC, written block by block (cheap to build, large to decode)."""
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", rate, channels, format="FLAC", subtype="PCM_16") as file:
        block = np.zeros((rate, channels), dtype=np.int16)
        for _ in range(int(seconds)):
            file.write(block)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: each refused with its status, code and param; the server keeps serving
# ----------------------------------------------------------------------------------------------------------------------

DEEP = b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"
BAD = [
    # (name, path, body, status, code, param)
    ("too many messages", CHAT, chat(messages=[{"role": "user", "content": "x"}] * 9), 400, "too_many_messages",
     "messages"),
    ("too many audio parts", CHAT, chat(messages=user(*[audio_part(wav_bytes(0.2))] * 4)), 400,
     "too_many_audio_parts", "messages"),
    ("clip over the per-clip limit", CHAT, chat(messages=user(audio_part(wav_bytes(2.5)))), 400, "audio_too_long",
     "messages[0].content[1].input_audio.data"),
    ("clips over the request total", CHAT, chat(messages=user(audio_part(wav_bytes(1.8)), audio_part(wav_bytes(1.8)))),
     400, "audio_too_long", "messages[0].content[2].input_audio.data"),
    ("8 channels at 192 kHz", CHAT, chat(messages=user(audio_part(flac_bytes(1, 192000, 8), kind="audio"))), 400,
     "audio_too_long", "messages[0].content[1].audio"),
    ("prompt over the token limit", CHAT, chat(messages=[{"role": "user", "content": "word " * 400}]), 400,
     "context_length_exceeded", "messages"),
    ("prompt far over the token limit", CHAT, chat(messages=[{"role": "user", "content": "w" * 10000}]), 400,
     "context_length_exceeded", "messages"),
    ("instructions too long", SPEECH, {"model": MODEL, "input": "Hi", "voice": "operator", "instructions": "x" * 101},
     400, None, "instructions"),
    ("NUL in a prompt_audio path", CHAT, chat(prompt_audio="clips/question.wav\x00.txt", prompt_text="hi"), 400,
     "file_not_allowed", "prompt_audio"),
    ("NUL in a voice upload", VOICES, {"audio": "voice\x00.wav", "transcript": "hi"}, 400, "file_not_allowed",
     "audio"),
    ("deep JSON on a voice upload", VOICES, DEEP, 400, None, None),
    ("deep JSON on chat", CHAT, DEEP, 400, None, None),
    ("voice shorter than a frame", VOICES, {"audio": b64(wav_bytes(0.05)), "transcript": "hi"}, 400,
     "audio_too_short", "audio"),
    ("empty voice", VOICES, {"audio": "data:audio/wav;base64," + b64(wav_bytes(0.0)), "transcript": "hi"}, 400, "invalid_audio", "audio"),
    ("prompt_audio shorter than a frame", CHAT, chat(prompt_audio=b64(wav_bytes(0.05)), prompt_text="hi"), 400,
     "audio_too_short", "prompt_audio"),
    ("path outside the allowed directory", CHAT, chat(prompt_audio="../../etc/passwd", prompt_text="hi"), 400,
     "file_not_allowed", "prompt_audio"),
    ("audio part in an assistant turn", CHAT, chat(messages=[{"role": "assistant", "content": [
        {"type": "audio", "audio": b64(wav_bytes(0.5))}]}]), 400, None, "messages[0].content[0]"),
    ("audio part that is not a string", CHAT, chat(messages=user({"type": "audio", "audio": 5})), 400, None,
     "messages[0].content[1].audio"),
]


@pytest.mark.parametrize("name, path, body, status, code, param", BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_refused_with_its_param(server, name, path, body, status, code, param):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param) if code else error["param"] == param, error
    assert "object at 0x" not in error["message"] and "/tmp" not in error["message"], error


def test_no_object_reprs_or_paths_in_decode_errors(server):
    for source in ("data:audio/wav;base64," + b64(b"not audio at all " * 8), b64(b"RIFF" + b"\x01" * 200)):
        error = post(server, CHAT, chat(prompt_audio=source, prompt_text="hi")).json()["error"]
        assert error["code"] == "invalid_audio" and error["param"] == "prompt_audio"
        assert "object at" not in error["message"] and "/tmp" not in error["message"], error
    assert server.health()["worker_alive"]


# ----------------------------------------------------------------------------------------------------------------------
# Long prompts are prefilled alone
# ----------------------------------------------------------------------------------------------------------------------


def test_prefill_groups_keep_long_prompts_alone():
    from openchroma.serving.engine import prefill_groups

    assert prefill_groups([10, 12, 9], max_rows=16, max_tokens=100) == [[0, 1, 2]]
    assert prefill_groups([10, 500, 12, 9], max_rows=16, max_tokens=100) == [[0], [1], [2, 3]]
    assert prefill_groups([10] * 5, max_rows=2, max_tokens=1000) == [[0, 1], [2, 3], [4]]
    assert prefill_groups([30, 30, 30, 30], max_rows=16, max_tokens=100) == [[0, 1, 2], [3]]


def test_long_prompt_beside_a_short_one_equals_solo_runs(server):
    """A long prompt and a short one arriving together are prefilled apart and each answer equals its solo run."""
    engine = server.app.state.engine
    long_text = "Tell me everything about " + "the sea and the sky, " * 12
    bodies = [chat(messages=[{"role": "user", "content": long_text}], max_audio_frames=3,
                   audio={"voice": "operator", "format": "pcm16"}),
              chat(messages=[{"role": "user", "content": "Hi"}], max_audio_frames=3,
                   audio={"voice": "operator", "format": "pcm16"})]
    solo = [post(server, CHAT, body).json()["choices"][0]["message"]["audio"]["data"] for body in bodies]
    old, engine.max_prefill_tokens = engine.max_prefill_tokens, 64
    before = server.health()["batches_total"]
    try:
        with __import__("concurrent.futures").futures.ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda body: post(server, CHAT, body).json(), bodies))
    finally:
        engine.max_prefill_tokens = old
    assert [reply["choices"][0]["message"]["audio"]["data"] for reply in together] == solo
    assert server.health()["batches_total"] - before == 2  # two prefills, even had they arrived in one window


# ----------------------------------------------------------------------------------------------------------------------
# Chroma-SGLang drop-in
# ----------------------------------------------------------------------------------------------------------------------


def test_sglang_audio_parts_paths_and_top_level_audio(server):
    """{"type": "audio", "audio": base64 | data URI | path} give what input_audio gives; return_audio adds a
    top-level base64 WAV equal to message.audio; no voice named -> the one registered voice."""
    question = wav_bytes(1.0, 200.0, rate=16000)
    base = {"model": "chroma", "max_audio_frames": 3, "return_audio": True}
    replies = []
    for part in (audio_part(question), audio_part(question, kind="audio"),
                 {"type": "audio", "audio": "data:audio/wav;base64," + b64(question)},
                 {"type": "audio", "audio": "clips/question.wav"},
                 {"type": "audio", "audio": str(server.allowed / "clips" / "question.wav")}):
        reply = post(server, CHAT, dict(base, messages=user(part)))
        assert reply.status_code == 200, reply.text
        replies.append(reply.json())
    data = {reply["choices"][0]["message"]["audio"]["data"] for reply in replies}
    assert len(data) == 1
    assert all(reply["audio"] == reply["choices"][0]["message"]["audio"]["data"] for reply in replies)
    named = post(server, CHAT, dict(base, messages=user(audio_part(question)), audio={"voice": "operator"})).json()
    assert named["audio"] == replies[0]["audio"]  # the default voice is the one registered voice
    pcm = post(server, CHAT, dict(base, messages=user(audio_part(question)),
                                  audio={"voice": "operator", "format": "pcm16"})).json()
    assert pcm["audio"] == replies[0]["audio"]  # the top-level audio is WAV whatever message.audio's format
    assert len(decode_wav(base64.b64decode(pcm["audio"]))) == 3 * FRAME_SAMPLES


def test_sglang_prompt_audio_path_and_model_aliases(server):
    reference = wav_bytes(1.0, 330.0)
    (server.allowed / "ref.wav").write_bytes(reference)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_audio_frames": 3, "return_audio": True,
            "prompt_text": "hello there my friend"}
    by_path = post(server, CHAT, dict(body, model="FlashLabs/Chroma-4B", prompt_audio="ref.wav")).json()
    by_base64 = post(server, CHAT, dict(body, model=MODEL, prompt_audio=b64(reference))).json()
    registered = post(server, CHAT, dict(body, model="chroma", prompt_text=None)).json()
    assert by_path["audio"] == by_base64["audio"] == registered["audio"]  # the operator voice is the same recording


# ----------------------------------------------------------------------------------------------------------------------
# /v1/audio/speech against the library's forced-text output
# ----------------------------------------------------------------------------------------------------------------------


def test_speech_equals_the_library_forced_text_output(server):
    text = "Hello world, this is Chroma."
    pcm = httpx.post(server.url + SPEECH, timeout=60, json={
        "model": MODEL, "input": text, "voice": "operator", "response_format": "pcm", "temperature": 0,
        "max_audio_frames": 6}).content

    processor, model = server.processor, server.model
    # the prompt the CLI and the text-to-speech pipeline use
    inputs = processor([{"role": "system", "content": SPEAK_SYSTEM_PROMPT},
                        {"role": "user", "content": SPEAK_REQUEST.format(text=text)}])
    ids = processor.tokenizer(text, add_special_tokens=False).input_ids
    chunks = list(model.stream(**inputs, voice=server.app.state.voices.get("operator"), forced_text_ids=[ids],
                               max_new_tokens=6, chunk_frames=(2,)))
    expected = torch.cat([c.pcm[0, : int(c.audio_valid[0].sum()) * FRAME_SAMPLES] for c in chunks]).numpy()
    assert pcm == (np.clip(expected, -1, 1) * 32767).astype("<i2").tobytes()
    assert len(pcm) == 6 * FRAME_SAMPLES * 2


# ----------------------------------------------------------------------------------------------------------------------
# Voices
# ----------------------------------------------------------------------------------------------------------------------


def test_operator_voices_cannot_be_deleted(server):
    refused = httpx.delete(server.url + "/v1/audio/voices/operator")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "voice_protected"
    assert httpx.get(server.url + "/v1/audio/voices/operator").json()["protected"] is True
    created = post(server, VOICES, {"audio": b64(wav_bytes(0.5)), "transcript": "a user voice"}).json()
    assert created["protected"] is False
    assert httpx.delete(server.url + f"/v1/audio/voices/{created['id']}").json()["deleted"]


def test_orphans_from_a_crash_are_removed_at_startup(tmp_path, caplog):
    store = VoiceStore(tmp_path)
    voice = server_voice()
    store.add(voice, {"id": "kept", "created_at": 0})
    (tmp_path / "crashed.safetensors").write_bytes((tmp_path / "kept.safetensors").read_bytes())  # no .json
    (tmp_path / "half.json.partial").write_text("{")
    with caplog.at_level(logging.WARNING, logger="openchroma.server"):
        reloaded = VoiceStore(tmp_path)
    assert sorted(reloaded.orphans_removed) == ["crashed.safetensors", "half.json.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "kept.safetensors"]
    assert reloaded.get("kept") is not None and "interrupted voice upload" in caplog.text


def server_voice():
    from openchroma.voice_chroma import ChromaVoice

    return ChromaVoice(text_ids=torch.tensor([1, 2, 3]), codes=torch.zeros(4, 8, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------------
# HTTP hygiene
# ----------------------------------------------------------------------------------------------------------------------


def raw_exchange(server, data: bytes, wait_s: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes the connection (or wait_s passes)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait_s) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except socket.timeout:
            received += b"<still open>"
    return received


def test_content_length_with_transfer_encoding_is_refused_and_closed(server):
    smuggled = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    received = raw_exchange(server, smuggled)
    assert received.startswith(b"HTTP/1.1 400") and b"ambiguous_framing" in received
    assert received.count(b"HTTP/1.1") == 1 and not received.endswith(b"<still open>")  # closed, no 2nd answer


def test_slow_or_idle_connections_are_closed(server):
    assert raw_exchange(server, b"") == b""  # no request head within header_timeout_s: closed
    assert raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n") == b""  # a head that never ends
    slow_body = raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mod")
    assert slow_body.startswith(b"HTTP/1.1 408") and not slow_body.endswith(b"<still open>")
    assert server.health()["worker_alive"]


def test_api_docs_need_the_key_when_one_is_set(server):
    assert httpx.get(server.url + "/openapi.json").status_code == 200
    server.settings.api_key = "sekret"
    try:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(server.url + path).status_code == 401, path
        assert httpx.get(server.url + "/openapi.json", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.settings.api_key = None


# ----------------------------------------------------------------------------------------------------------------------
# URL fetching
# ----------------------------------------------------------------------------------------------------------------------


class AudioHandler(http.server.BaseHTTPRequestHandler):
    clip = wav_bytes(1.0, 200.0, rate=16000)
    drip_started = threading.Event()
    drip_released = threading.Event()

    def do_GET(self):
        if self.path == "/clip.wav":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.clip)))
            self.end_headers()
            self.wfile.write(self.clip)
        elif self.path == "/redirect.wav":
            self.send_response(302)
            self.send_header("Location", "/clip.wav")
            self.end_headers()
        elif self.path == "/drip.wav":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.clip)))
            self.end_headers()
            self.drip_started.set()
            for byte in self.clip[:20]:
                if self.drip_released.wait(0.3):
                    break
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def audio_site():
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AudioHandler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    AudioHandler.drip_released.set()
    site.shutdown()


def url_chat(url):
    return chat(messages=user({"type": "audio", "audio": url}), max_audio_frames=2)


def test_url_fetching_rules(server, audio_site):
    refused = post(server, CHAT, url_chat(audio_site + "/clip.wav")).json()["error"]
    assert (refused["code"], refused["param"]) == ("url_not_allowed", "messages[0].content[1].audio")
    server.app.state.fetcher.allow_private = True
    try:
        fetched = post(server, CHAT, url_chat(audio_site + "/clip.wav")).json()
        inline = post(server, CHAT, chat(messages=user(audio_part(AudioHandler.clip)), max_audio_frames=2)).json()
        assert fetched["choices"][0]["message"]["audio"]["data"] == inline["choices"][0]["message"]["audio"]["data"]
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            closed_port = closed.getsockname()[1]
        errors = [post(server, CHAT, url_chat(url)).json()["error"] for url in (
            audio_site + "/redirect.wav", audio_site + "/missing.wav", f"http://127.0.0.1:{closed_port}/a.wav",
            f"http://127.0.0.1:{server.port}/health")]
        assert {(e["code"], e["message"]) for e in errors} == {  # one answer: no port-scan oracle
            ("url_fetch_failed", "'messages[0].content[1].audio': could not fetch audio from this URL.")}
    finally:
        server.app.state.fetcher.allow_private = False


def test_a_dripping_url_delays_only_its_own_request(server, audio_site):
    """The drip runs on the fetch threads: a request sent meanwhile is answered while the drip still runs; the drip
    request itself fails at its total deadline."""
    server.app.state.fetcher.allow_private = True
    result = {}
    try:
        thread = threading.Thread(target=lambda: result.update(drip=post(server, CHAT, url_chat(
            audio_site + "/drip.wav")).json()))
        thread.start()
        assert AudioHandler.drip_started.wait(30)
        other = post(server, CHAT, chat(messages=user(audio_part(wav_bytes(0.5, rate=16000))), max_audio_frames=2))
        still_dripping = thread.is_alive()
        thread.join(60)
    finally:
        server.app.state.fetcher.allow_private = False
    assert other.status_code == 200 and still_dripping
    assert result["drip"]["error"]["code"] == "url_fetch_failed"


def test_health_fields_match_the_docs(server):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text()
    paragraph = text[text.index("`GET /health` reports"):]
    paragraph = re.sub(r"\(`ok`, `starting` or `draining`\)", "", paragraph[:paragraph.index("\n\n")])
    documented = set(re.findall(r"`([a-z_]+)`", paragraph))
    health = server.health()
    assert set(health) == documented
    assert health["status"] == "ok" and health["draining"] is False


def test_served_model_name_takes_aliases():
    import argparse

    from openchroma.serving.app import add_serve_arguments

    parser = add_serve_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--served-model-name", "chroma-4b", "chroma", "FlashLabs/Chroma-4B"])
    assert (args.served_model_name, args.served_model_aliases) == ("chroma-4b", ("chroma", "FlashLabs/Chroma-4B"))
    default = parser.parse_args([])
    assert (default.served_model_name, default.served_model_aliases) == (None, ())
