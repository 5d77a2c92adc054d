"""The OpenAI-compatible server (serving/): real HTTP on 127.0.0.1 with the tiny random model.

One uvicorn server runs in a background thread for the whole module; the official `openai` client and raw httpx
drive it. The tiny model's audio is noise and its text gibberish, so the checks are about shapes, framing,
equality between runs (solo vs under load, streaming vs not) and errors, never about content.
"""

import base64
import concurrent.futures
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
sf = pytest.importorskip("soundfile")


from openchroma.serving.app import ChromaEngine, ServerSettings, VoiceStore, create_app, uvicorn_config  # noqa: E402
from openchroma.testing import build_tiny_model, build_tiny_processor  # noqa: E402


MODEL = "chroma-tiny"
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz


def wav_bytes(seconds=1.0, freq=220.0, rate=24000, noise_seed=0):
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(noise_seed).standard_normal(t.size)
    buffer = io.BytesIO()
    sf.write(buffer, wave.astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Server:
    """uvicorn serving create_app(...) in a daemon thread, configured as `openchroma serve` configures it."""

    def __init__(self, app):
        self.app = app
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, app.state.settings, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def health(self):
        return httpx.get(self.url + "/health").json()

    def client(self, api_key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and immune to a busy machine
    model = build_tiny_model()
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "ref.wav").write_bytes(wav_bytes(freq=330.0))
    settings = ServerSettings(
        model_name=MODEL, model_aliases=("openchroma/tiny",), voices_dir=tmp_path_factory.mktemp("voices"),
        default_max_frames=6, max_frames=600, max_audio_seconds=5.0, max_body_bytes=1024 * 1024,
        max_input_chars=200, max_text_tokens=64,
    )
    engine = ChromaEngine(model, build_tiny_processor(), max_batch_size=16, batch_window_s=0.05)
    with Server(create_app(engine, settings)) as running:
        running.settings, running.model, running.allowed = settings, model, allowed
        running.voice = create_voice(running.url, wav_bytes(), "hello there my friend", name="first")["id"]
        running.voice2 = create_voice(running.url, wav_bytes(0.6, 440.0), "good morning", name="second")["id"]
        yield running
    torch.set_num_threads(threads)


def create_voice(url, audio, transcript, name):
    response = httpx.post(url + "/v1/audio/voices", files={"audio_sample": ("ref.wav", audio, "audio/wav")},
                          data={"transcript": transcript, "name": name}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def decode_wav(data: bytes):
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 24000
    return samples


def audio_field(audio, name) -> str:
    """delta.audio is a typed object in recent openai releases and a plain dict in older ones."""
    value = audio.get(name) if isinstance(audio, dict) else getattr(audio, name, None)
    return value or ""


def user(text="Hello, how are you?", audio=None):
    content = [{"type": "text", "text": text}]
    if audio is not None:
        content.append({"type": "input_audio", "input_audio": {"data": b64(audio), "format": "wav"}})
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------------------------------------------------
# Chat completions
# ----------------------------------------------------------------------------------------------------------------------


def test_chat_with_audio_in_and_out(server):
    client = server.client()
    reply = client.chat.completions.create(
        model=MODEL, modalities=["text", "audio"], audio={"voice": server.voice, "format": "wav"},
        messages=user(audio=wav_bytes(1.5, 180.0)), extra_body={"max_audio_frames": 5},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length"  # the tiny model never emits the end-of-audio frame
    assert choice.message.content == choice.message.audio.transcript
    assert choice.message.audio.id.startswith("audio_") and choice.message.audio.expires_at > time.time()
    assert len(decode_wav(base64.b64decode(choice.message.audio.data))) == 5 * FRAME_SAMPLES
    assert reply.usage.completion_tokens_details.audio_tokens == 5
    assert reply.usage.prompt_tokens_details.audio_tokens > 0  # the question's audio tokens

    # a later turn references the answer by its audio id (the transcript stands in for it)
    follow_up = client.chat.completions.create(
        model=MODEL, modalities=["text"], max_completion_tokens=3,
        messages=user() + [{"role": "assistant", "audio": {"id": choice.message.audio.id}}]
        + [{"role": "user", "content": "And then?"}],
    )
    assert follow_up.choices[0].message.audio is None
    assert follow_up.usage.completion_tokens_details.text_tokens <= 3


def test_streaming_equals_non_streaming(server):
    client = server.client()
    kwargs = dict(model=MODEL, modalities=["text", "audio"], audio={"voice": {"id": server.voice2}, "format": "pcm16"},
                  messages=user("Tell me a story."), extra_body={"max_audio_frames": 7})
    whole = client.chat.completions.create(**kwargs).choices[0].message
    pcm, transcript, ids, usage, reasons = b"", "", set(), None, []
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if not chunk.choices:
            usage = chunk.usage
            continue
        audio = getattr(chunk.choices[0].delta, "audio", None)
        if audio:
            pcm += base64.b64decode(audio_field(audio, "data"))
            transcript += audio_field(audio, "transcript")
            ids.add(audio_field(audio, "id"))
        reasons.append(chunk.choices[0].finish_reason)
    assert pcm == base64.b64decode(whole.audio.data)  # pcm16 both ways
    assert len(pcm) == 7 * FRAME_SAMPLES * 2
    assert transcript == whole.audio.transcript
    assert reasons[-1] == "length" and usage.completion_tokens_details.audio_tokens == 7
    assert len(ids - {""}) == 1


def test_sse_framing(server):
    body = {"model": MODEL, "modalities": ["text", "audio"], "audio": {"voice": server.voice, "format": "pcm16"},
            "messages": user(), "stream": True, "max_audio_frames": 4}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(base64.b64decode(c["choices"][0]["delta"].get("audio", {}).get("data", "")))
               for c in chunks) == 4 * FRAME_SAMPLES * 2


def test_text_only_answers(server):
    """modalities ["text"]: no voice needed, the text streams as delta.content and equals the non-streamed text."""
    client = server.client()
    kwargs = dict(model=MODEL, messages=user("Count to three."), max_completion_tokens=6)
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.audio is None and whole.usage.completion_tokens_details.audio_tokens == 0
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(stream=True, **kwargs) if chunk.choices)
    assert streamed == whole.choices[0].message.content


def test_sglang_prompt_audio_equals_registered_voice(server):
    """prompt_audio + prompt_text per request give what the same recording registered as a voice gives."""
    reference = wav_bytes()
    body = {"model": MODEL, "messages": user("Hi"), "max_audio_frames": 4, "return_audio": True,
            "prompt_audio": "data:audio/wav;base64," + b64(reference), "prompt_text": "hello there my friend"}
    inline = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    registered = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": user("Hi"), "max_audio_frames": 4, "audio": {"voice": server.voice}}).json()
    assert inline["choices"][0]["message"]["audio"]["data"] == registered["choices"][0]["message"]["audio"]["data"]

    allowed = dict(body, prompt_audio=str(server.allowed / "ref.wav"))
    assert httpx.post(server.url + "/v1/chat/completions", json=allowed).status_code == 400  # paths are off
    server.settings.allow_dirs = (str(server.allowed),)
    try:
        reply = httpx.post(server.url + "/v1/chat/completions", json=allowed, timeout=60)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["audio"]["data"]
        outside = dict(body, prompt_audio=str(server.allowed / ".." / "elsewhere.wav"))
        assert httpx.post(server.url + "/v1/chat/completions", json=outside).status_code == 400
    finally:
        server.settings.allow_dirs = ()


# ----------------------------------------------------------------------------------------------------------------------
# Speech and voices
# ----------------------------------------------------------------------------------------------------------------------


def test_speech_formats_and_streaming(server):
    client = server.client()
    common = dict(model=MODEL, voice=server.voice, input="Hello world, this is Chroma.",
                  extra_body={"max_audio_frames": 6})
    wav = decode_wav(client.audio.speech.create(response_format="wav", **common).content)
    assert len(wav) == 6 * FRAME_SAMPLES
    pcm = np.frombuffer(client.audio.speech.create(response_format="pcm", **common).content, dtype="<i2")
    assert np.array_equal(pcm, wav)
    flac, _ = sf.read(io.BytesIO(client.audio.speech.create(response_format="flac", **common).content), dtype="int16")
    assert np.array_equal(flac, wav)
    for fmt in ("mp3", "opus"):
        if fmt.upper() in sf.available_formats() or (fmt == "opus" and "OGG" in sf.available_formats()):
            samples, rate = sf.read(io.BytesIO(client.audio.speech.create(response_format=fmt, **common).content))
            assert rate == 24000 and abs(len(samples) - len(wav)) < 2 * FRAME_SAMPLES

    with client.audio.speech.with_streaming_response.create(response_format="pcm", **common) as response:
        assert response.headers["x-audio-sample-rate"] == "24000"
        pieces = list(response.iter_bytes())
    assert np.array_equal(np.frombuffer(b"".join(pieces), dtype="<i2"), wav)

    events = client.audio.speech.create(response_format="pcm", stream_format="sse", **common).content.decode()
    parsed = [json.loads(e[len("data: "):]) for e in events.strip().split("\n\n")]
    assert [e["type"] for e in parsed[:-1]] == ["speech.audio.delta"] * (len(parsed) - 1)
    assert parsed[-1]["type"] == "speech.audio.done" and parsed[-1]["usage"]["output_tokens"] == 6
    streamed = b"".join(base64.b64decode(e["audio"]) for e in parsed[:-1])
    assert np.array_equal(np.frombuffer(streamed, dtype="<i2"), wav)

    # the voice as an object, and an OpenAI built-in name without a default voice
    assert client.audio.speech.create(response_format="wav", **dict(common, voice={"id": server.voice})).content
    with pytest.raises(openai.BadRequestError, match="Unknown voice"):
        client.audio.speech.create(response_format="wav", **dict(common, voice="alloy"))


def test_voice_lifecycle(server):
    client = server.client()
    created = client.audio.voices.create(audio_sample=("me.wav", wav_bytes(0.8, 260.0), "audio/wav"), name="me",
                                         consent="cons_local", extra_body={"transcript": "testing one two"})
    voice_id = created.id
    assert created.object == "audio.voice" and created.name == "me"
    folder = server.settings.voices_dir
    assert (folder / f"{voice_id}.safetensors").exists() and (folder / f"{voice_id}.json").exists()
    assert voice_id in [v["id"] for v in httpx.get(server.url + "/v1/audio/voices").json()["data"]]
    info = httpx.get(server.url + f"/v1/audio/voices/{voice_id}").json()
    assert info["transcript"] == "testing one two" and info["frames"] == 10  # 0.8 s at 12.5 frames/s
    assert VoiceStore(folder).get(voice_id).transcript == "testing one two"  # reloads from disk

    spoken = client.audio.speech.create(model=MODEL, voice=voice_id, input="Hi", response_format="wav",
                                        extra_body={"max_audio_frames": 2})
    assert len(decode_wav(spoken.content)) == 2 * FRAME_SAMPLES

    deleted = client.audio.voices.delete(voice_id)
    assert deleted.deleted and not (folder / f"{voice_id}.json").exists()
    assert httpx.get(server.url + f"/v1/audio/voices/{voice_id}").status_code == 404
    assert httpx.delete(server.url + f"/v1/audio/voices/{voice_id}").status_code == 404


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == [MODEL]
    assert httpx.get(server.url + "/v1/models/openchroma/tiny").json()["id"] == MODEL
    health = server.health()
    assert health["status"] == "ok" and health["worker_alive"]


# ----------------------------------------------------------------------------------------------------------------------
# Concurrency
# ----------------------------------------------------------------------------------------------------------------------


def stream_chat(url, body):
    """-> (transcript, pcm16 bytes, finish_reason) of a streamed chat answer."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    transcript, pcm, reason = "", b"", None
    for chunk in client.chat.completions.create(stream=True, **body):
        delta = chunk.choices[0].delta
        if getattr(delta, "audio", None):
            transcript += audio_field(delta.audio, "transcript")
            pcm += base64.b64decode(audio_field(delta.audio, "data"))
        reason = chunk.choices[0].finish_reason or reason
    return transcript, pcm, reason


def test_concurrent_streams_equal_solo_runs(server):
    """16 streaming clients at once (greedy and seeded sampling, two voices, different lengths and prompts) get
    exactly what each gets alone, and they share batches."""
    prompts = ["Hello!", "What is the weather like?", "Tell me about the sea.", "One, two, three."]
    bodies = []
    for i in range(16):
        body = {"model": MODEL, "modalities": ["text", "audio"], "messages": user(prompts[i % 4]),
                "audio": {"voice": server.voice if i % 2 else server.voice2, "format": "pcm16"},
                "extra_body": {"max_audio_frames": 3 + i % 5}}
        if i % 3 == 0:
            body.update(temperature=0.9, top_p=0.95, seed=100 + i)
        elif i % 3 == 1:
            body["temperature"] = 0
        bodies.append(body)
    solo = [stream_chat(server.url, body) for body in bodies]
    for (_, pcm, reason), body in zip(solo, bodies):
        assert len(pcm) == body["extra_body"]["max_audio_frames"] * FRAME_SAMPLES * 2 and reason == "length"

    def all_at_once():
        batches_before = server.health()["batches_total"]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda body: stream_chat(server.url, body), bodies))
        assert server.health()["batches_total"] - batches_before < 16  # requests shared decode steps
        return results

    engine = server.app.state.engine
    engine.exact_audio = True  # each row's audio decoded alone: bit-identical
    try:
        assert all_at_once() == solo
    finally:
        engine.exact_audio = False
    # batched audio decoding (the default): same codes and text; samples within float rounding (1 LSB)
    for (text, pcm, reason), (solo_text, solo_pcm, solo_reason) in zip(all_at_once(), solo):
        assert (text, len(pcm), reason) == (solo_text, len(solo_pcm), solo_reason)
        difference = np.frombuffer(pcm, "<i2").astype(int) - np.frombuffer(solo_pcm, "<i2")
        assert np.abs(difference).max() <= 1
    # sampling is really on: different seeds give different audio
    reseeded = stream_chat(server.url, dict(bodies[0], seed=999))
    assert reseeded[1] != solo[0][1]


def test_requests_join_a_running_batch(server):
    """Requests arriving while a long answer streams join its batch at the next frame (continuous batching): chat
    (greedy and seeded), speech and text-only rows, joining at different frames, each get exactly their solo answer;
    the long answer is unchanged by its company."""
    client = server.client()
    long_body = {"model": MODEL, "modalities": ["text", "audio"], "messages": user("Tell me a long story."),
                 "audio": {"voice": server.voice, "format": "pcm16"}, "temperature": 0.8, "seed": 7,
                 "extra_body": {"max_audio_frames": 120}}
    bodies = []
    for i in range(6):
        body = {"model": MODEL, "modalities": ["text", "audio"], "messages": user(["Hi!", "Why?", "Sing."][i % 3]),
                "audio": {"voice": server.voice2 if i % 2 else server.voice, "format": "pcm16"},
                "extra_body": {"max_audio_frames": 4 + i}}
        if i % 2:
            body.update(temperature=0.9, top_p=0.9, seed=50 + i)
        bodies.append(body)
    speech = dict(model=MODEL, voice=server.voice, input="Joining late.", response_format="pcm",
                  extra_body={"max_audio_frames": 5})

    def speak():
        return client.audio.speech.create(**speech).content

    def text_only():  # no audio: the row leaves when its text is complete
        return client.chat.completions.create(model=MODEL, messages=user("Count to three."),
                                              max_completion_tokens=6).choices[0].message.content

    solo_long, solo = stream_chat(server.url, long_body), [stream_chat(server.url, body) for body in bodies]
    solo_speech, solo_text = speak(), text_only()

    def run_with_company():
        joined_before = server.health().get("joined_running_total", 0)
        started = threading.Event()
        result = {}

        def long_answer():
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            transcript, pcm = "", b""
            for chunk in client.chat.completions.create(stream=True, **long_body):
                audio = getattr(chunk.choices[0].delta, "audio", None)
                if audio:
                    transcript += audio_field(audio, "transcript")
                    pcm += base64.b64decode(audio_field(audio, "data"))
                    started.set()
            result["long"] = (transcript, pcm, "length")

        thread = threading.Thread(target=long_answer)
        thread.start()
        assert started.wait(30)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            chats = [pool.submit(stream_chat, server.url, body) for body in bodies]
            time.sleep(0.05)  # some arrive a few frames later than others
            spoken, written = pool.submit(speak), pool.submit(text_only)
            outputs = [f.result() for f in chats], spoken.result(), written.result()
        thread.join(60)
        assert server.health()["joined_running_total"] - joined_before >= 1
        return result["long"], outputs

    engine = server.app.state.engine
    engine.exact_audio = True  # each row's audio decoded alone: bit-identical
    try:
        long_answer, (chats, spoken, written) = run_with_company()
    finally:
        engine.exact_audio = False
    assert long_answer == solo_long
    assert chats == solo
    assert spoken == solo_speech
    assert written == solo_text
    # batched audio decoding: the same codes and text, samples within float rounding (1 LSB)
    long_answer, (chats, spoken, written) = run_with_company()
    assert written == solo_text
    for got, expected in zip([long_answer] + chats, [solo_long] + solo):
        assert (got[0], len(got[1]), got[2]) == (expected[0], len(expected[1]), expected[2])
        difference = np.frombuffer(got[1], "<i2").astype(int) - np.frombuffer(expected[1], "<i2")
        assert np.abs(difference).max() <= 1
    assert np.abs(np.frombuffer(spoken, "<i2").astype(int) - np.frombuffer(solo_speech, "<i2")).max() <= 1


def test_seeded_answer_equals_the_library(server):
    """A seeded, sampled answer from the server is what `model.stream(seed=...)` gives for the same inputs."""
    body = {"model": MODEL, "modalities": ["text", "audio"], "audio": {"voice": server.voice, "format": "pcm16"},
            "messages": user("Sing me a song."), "temperature": 0.8, "top_p": 0.9, "seed": 1234,
            "extra_body": {"max_audio_frames": 5}}
    transcript, pcm, _ = stream_chat(server.url, body)

    processor = server.app.state.engine.processor
    inputs = processor([{"role": "user", "content": [{"type": "text", "text": "Sing me a song."}]}])
    chunks = list(server.model.stream(
        **inputs, voice=server.app.state.voices.get(server.voice), max_new_tokens=5, chunk_frames=(2,),
        do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=1234))
    expected = torch.cat([c.pcm[0] for c in chunks]).numpy()
    assert pcm == (np.clip(expected, -1, 1) * 32767).astype("<i2").tobytes()
    assert transcript == processor.decode(torch.cat([c.text_ids[0] for c in chunks]))


def test_disconnect_cancels_generation(server):
    before = server.health()
    body = {"model": MODEL, "modalities": ["text", "audio"], "audio": {"voice": server.voice, "format": "pcm16"},
            "messages": user(), "stream": True, "max_audio_frames": 500}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # a few chunks, then hang up
    assert any('"audio"' in line for line in received)
    deadline = time.time() + 20
    while server.health()["cancelled_total"] == before.get("cancelled_total", 0):
        assert time.time() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    after = server.health()
    assert after["active_rows"] == 0
    assert after["frames_total"] - before["frames_total"] < 100  # stopped long before 500 frames
    # the slot is free: the next request is served at once
    reply = server.client().chat.completions.create(model=MODEL, modalities=["text", "audio"],
                                                     audio={"voice": server.voice, "format": "wav"}, messages=user())
    assert reply.choices[0].message.audio.data


# ----------------------------------------------------------------------------------------------------------------------
# Bad requests
# ----------------------------------------------------------------------------------------------------------------------

CHAT, SPEECH, VOICES = "/v1/chat/completions", "/v1/audio/speech", "/v1/audio/voices"


def chat(**overrides):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_audio_frames": 2,
            "modalities": ["text", "audio"], "audio": {"voice": "VOICE", "format": "wav"}}
    body.update(overrides)
    return body


def speech(**overrides):
    return dict({"model": MODEL, "input": "Hello", "voice": "VOICE", "response_format": "wav"}, **overrides)


def audio_message(data):
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}]


BAD_REQUESTS = [
    # (name, path, json body or raw bytes, expected status, words the message must contain)
    ("bad JSON", CHAT, b'{"model": "chroma-tiny", "messages": [', 400, "not valid JSON"),
    ("body not an object", CHAT, b"[1, 2]", 400, "JSON object"),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("empty messages", CHAT, chat(messages=[]), 400, "messages"),
    ("unknown role", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400, "role"),
    ("content of the wrong type", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "content"),
    ("unknown model", CHAT, chat(model="gpt-4o"), 404, "does not exist"),
    ("unknown voice", CHAT, chat(audio={"voice": "nobody", "format": "wav"}), 400, "Unknown voice"),
    ("bad audio format", CHAT, chat(audio={"voice": "VOICE", "format": "aiff"}), 400, "audio.format"),
    ("bad base64", CHAT, chat(messages=audio_message("@@@ not base64 @@@")), 400, "not valid base64"),
    ("not audio", CHAT, chat(messages=audio_message(b64(b"hello, I am not a sound file" * 20))), 400, "not audio"),
    ("too-long audio", CHAT, chat(messages=audio_message(b64(wav_bytes(6.0)))), 400, "longer than"),
    ("temperature too high", CHAT, chat(temperature=5), 400, "temperature"),
    ("top_p of zero", CHAT, chat(top_p=0), 400, "top_p"),
    ("temperature not a number", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("stream not a boolean", CHAT, chat(stream="yes"), 400, "stream"),
    ("too many audio frames", CHAT, chat(max_audio_frames=10**6), 400, "max_audio_frames"),
    ("negative max_tokens", CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    ("n > 1", CHAT, chat(n=2), 400, "n"),
    ("path in prompt_audio", CHAT, chat(prompt_audio="/etc/passwd", prompt_text="x"), 400, "file paths"),
    ("URL in prompt_audio", CHAT, chat(prompt_audio="http://127.0.0.1:1/a.wav", prompt_text="x"), 400, "URLs"),
    ("prompt_audio without text", CHAT, chat(prompt_audio=b64(wav_bytes())), 400, "prompt_text"),
    ("unknown audio id", CHAT, chat(messages=[{"role": "assistant", "audio": {"id": "audio_nope"}}]), 400,
     "unknown or expired"),
    ("image content", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "unsupported content"),
    ("empty speech input", SPEECH, speech(input="   "), 400, "empty"),
    ("speech input too long", SPEECH, speech(input="x" * 500), 400, "longer than"),
    ("bad response_format", SPEECH, speech(response_format="aiff"), 400, "response_format"),
    ("unsupported aac", SPEECH, speech(response_format="aac"), 400, "not supported"),
    ("speed", SPEECH, speech(speed=2.0), 400, "speed"),
    ("voice of the wrong type", SPEECH, speech(voice=42), 400, "voice"),
    ("voice without transcript", VOICES, {"audio": b64(wav_bytes())}, 400, "transcript"),
    ("oversize body", CHAT, b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}', 413, "larger than"),
]


@pytest.mark.parametrize("name, path, body, status, words", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request(server, name, path, body, status, words):
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace('"VOICE"', json.dumps(server.voice)))
        response = httpx.post(server.url + path, json=body, timeout=60)
    else:
        response = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"},
                              timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words.lower() in error["message"].lower(), error


def test_server_survives_bad_requests_and_checks_api_key(server):
    """After every bad request above the server still answers; with an API key, /v1 needs it and /health does not."""
    assert len(BAD_REQUESTS) >= 15
    assert httpx.post(server.url + "/v1/audio/voices", content=b"junk", headers={"content-type": "text/plain"}
                      ).status_code == 415
    assert httpx.get(server.url + "/v1/nowhere").json()["error"]["code"] == "not_found"
    server.settings.api_key = "sekret"
    try:
        missing = httpx.get(server.url + "/v1/models")
        assert missing.status_code == 401 and "API key" in missing.json()["error"]["message"]
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            server.client().models.list()
        assert [m.id for m in server.client(api_key="sekret").models.list()] == [MODEL]
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.settings.api_key = None
    reply = server.client().audio.speech.create(model=MODEL, voice=server.voice, input="Still here",
                                                response_format="wav", extra_body={"max_audio_frames": 2})
    assert len(decode_wav(reply.content)) == 2 * FRAME_SAMPLES
    assert server.health()["worker_alive"]
