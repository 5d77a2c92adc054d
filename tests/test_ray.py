"""The server on Ray Serve (serving/ray_app.py): a real local Ray cluster started here (2 CPUs, no dashboard, a free
HTTP port) with 2 replicas of the tiny model, shut down at the end.

Checks: seeded answers through Ray equal the library's and the single-process server's (same bytes), errors and
limits are the single-process server's, a voice uploaded through one replica is usable through the other, and
killing a replica mid-stream gives its requests a clean error while the survivor finishes its own, serves new
requests, and Ray starts a replacement that sees every voice. No wall-clock assertions (the machine is shared).
"""

import asyncio
import base64
import io
import json
import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
sf = pytest.importorskip("soundfile")
pytest.importorskip("websockets")
from websockets.exceptions import ConnectionClosed  # noqa: E402

from openchroma.serving.app import create_app, engine_from_args, settings_from_args  # noqa: E402
from openchroma.serving.ray_app import (  # noqa: E402
    APP_NAME, SharedAnswerMemory, SharedVoiceStore, build_app, routing_key,
)
from openchroma.voice_chroma import ChromaVoice  # noqa: E402
from openchroma.testing import build_tiny_model, build_tiny_processor  # noqa: E402

pytestmark = pytest.mark.ray

FRAME_SAMPLES = 1920
LONG_FRAMES = 400  # a stream long enough to be killed halfway (the tiny model never ends its audio by itself)


def wav_bytes(seconds=1.0, freq=220.0, rate=24000):
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OPTIONS = {  # `openchroma serve` options, as a Serve config's `args`
    "replicas": 2, "replica_cpus": 0.5, "torch_threads": 1, "served_model_name": "chroma-tiny",
    "default_max_frames": 6, "max_frames": 600, "max_body_mb": 1, "max_audio_seconds": 5,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Ray (2 CPUs) + Serve on a free port + the application with 2 replicas and an operator voice 'default'."""
    folder = tmp_path_factory.mktemp("ray")
    (folder / "ref.txt").write_text("hello there my friend")
    (folder / "ref.wav").write_bytes(wav_bytes(freq=330.0))
    options = dict(OPTIONS, voices_dir=str(folder / "voices"),
                   register_voice=[["default", str(folder / "ref.wav"), str(folder / "ref.txt")]])
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")  # keep the cluster's own traffic on loopback
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        yield type("Cluster", (), {"url": f"http://127.0.0.1:{port}", "options": options,
                                   "voices": SharedVoiceStore(options["voices_dir"])})
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local(cluster):
    """The single-process server (create_app, in this process) on the same voices folder, and its model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    import argparse

    from openchroma.serving.app import add_serve_arguments

    defaults = vars(add_serve_arguments(argparse.ArgumentParser()).parse_args([]))
    options = argparse.Namespace(**dict(defaults, **cluster.options))  # what `openchroma serve ...` would run
    model = build_tiny_model()
    engine = engine_from_args(model, build_tiny_processor(), options)
    settings = settings_from_args(options)
    engine.start()
    app = create_app(engine, settings, SharedVoiceStore(cluster.options["voices_dir"]))
    yield type("Local", (), {"app": app, "model": model})
    engine.stop()
    torch.set_num_threads(threads)


def local_post(local, path, **kwargs):
    """A request to the single-process app, in this process (httpx's ASGI transport)."""

    async def post():
        transport = httpx.ASGITransport(app=local.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
            return await client.post(path, timeout=120, **kwargs)

    return asyncio.run(post())


def create_voice(url, audio, transcript):
    response = httpx.post(url + "/v1/audio/voices", files={"audio_sample": ("ref.wav", audio, "audio/wav")},
                          data={"transcript": transcript, "name": "uploaded"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["id"], response.headers["x-openchroma-replica"]


def sse_events(lines):
    """SSE lines -> the JSON events ([DONE] as the string "[DONE]")."""
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield payload if payload == "[DONE]" else json.loads(payload)


def read_chat_stream(events):
    """-> (transcript, pcm16 bytes, finish_reason, error event or None, saw [DONE])."""
    transcript, pcm, reason, error, done = "", b"", None, None, False
    for event in events:
        if event == "[DONE]":
            done = True
        elif "error" in event:
            error = event["error"]
        elif event.get("choices"):
            delta = event["choices"][0]["delta"]
            transcript += (delta.get("audio") or {}).get("transcript", "")
            pcm += base64.b64decode((delta.get("audio") or {}).get("data", ""))
            reason = event["choices"][0]["finish_reason"] or reason
    return transcript, pcm, reason, error, done


def chat_body(voice, frames, seed=None, stream=True, text="Sing me a song."):
    body = {"model": "chroma-tiny", "modalities": ["text", "audio"], "audio": {"voice": voice, "format": "pcm16"},
            "messages": [{"role": "user", "content": text}], "max_audio_frames": frames, "stream": stream}
    if seed is not None:
        body.update(temperature=0.8, top_p=0.9, seed=seed)
    return body


# ----------------------------------------------------------------------------------------------------------------------
# Without a cluster
# ----------------------------------------------------------------------------------------------------------------------


def test_routing_key_names_uploaded_voices_only():
    speech = json.dumps({"input": "hi", "voice": "voice_1a"}).encode()
    assert routing_key("/v1/audio/speech", speech, "default") == "voice_1a"
    chat = json.dumps({"messages": [], "audio": {"voice": {"id": "voice_2b"}}}).encode()
    assert routing_key("/v1/chat/completions", chat, "default") == "voice_2b"
    # balanced: the default voice, a request's own reference recording, other routes, unreadable bodies
    assert routing_key("/v1/audio/speech", json.dumps({"voice": "default"}).encode(), "default") == ""
    own = json.dumps({"voice": "voice_1a", "prompt_audio": "UklGRg==", "prompt_text": "hi"}).encode()
    assert routing_key("/v1/audio/speech", own, "default") == ""
    assert routing_key("/v1/audio/voices", speech, "default") == ""
    assert routing_key("/v1/audio/speech", b"{not json", "default") == ""
    assert routing_key("/v1/audio/speech", json.dumps({"voice": "../etc/passwd"}).encode(), None) == ""


def test_shared_voice_store_between_two_replicas(tmp_path):
    """Two stores on one folder (two replicas): a voice added by one is seen by the other, deleting it removes it
    for both, and `get` returns the same object while the files are unchanged (its prefix cache lives on it)."""
    first, second = SharedVoiceStore(tmp_path), SharedVoiceStore(tmp_path, capacity=1)
    voice = ChromaVoice(text_ids=torch.tensor([5, 6, 7]), codes=torch.arange(16).reshape(2, 8), transcript="hi")
    info = {"id": "voice_ab12", "object": "audio.voice", "created_at": 1, "transcript": "hi"}
    first.add(voice, info)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voice_ab12.json", "voice_ab12.safetensors"]
    loaded = second.get("voice_ab12")
    assert torch.equal(loaded.codes, voice.codes) and torch.equal(loaded.text_ids, voice.text_ids)
    assert second.get("voice_ab12") is loaded
    assert second.info("voice_ab12") == info and second.list() == [info]
    first.add(ChromaVoice(text_ids=torch.tensor([1]), codes=torch.zeros(1, 8, dtype=torch.long)),
              dict(info, id="voice_cd34", created_at=2))
    assert [v["id"] for v in second.list()] == ["voice_ab12", "voice_cd34"]
    second.get("voice_cd34")  # capacity 1: voice_ab12 leaves memory, and is read again from disk when needed
    assert second.get("voice_ab12") is not loaded and torch.equal(second.get("voice_ab12").codes, voice.codes)
    assert first.delete("voice_ab12") and second.get("voice_ab12") is None and second.info("voice_ab12") is None
    assert not second.delete("voice_ab12")
    assert second.get("../voice_cd34") is None and second.info("") is None
    with pytest.raises(ValueError, match="invalid voice id"):
        first.add(voice, dict(info, id="../escape"))


def test_shared_answer_memory_between_two_replicas(tmp_path):
    first, second = SharedAnswerMemory(tmp_path, ttl_s=60), SharedAnswerMemory(tmp_path, ttl_s=60)
    audio_id, expires_at = first.new_id()
    first.put(audio_id, expires_at, "the answer")
    assert second.transcript(audio_id) == "the answer"
    first.put("audio_" + "0" * 24, int(time.time()) - 1, "expired")
    assert second.transcript("audio_" + "0" * 24) is None
    second.remove_expired()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{audio_id}.json"]
    assert second.transcript("../" + audio_id) is None and second.transcript("audio_missing") is None
    with pytest.raises(ValueError, match="invalid audio id"):
        first.put("../escape", expires_at, "x")


def test_build_app_takes_the_serve_options():
    app = build_app({"replicas": 3, "replica_gpus": 0, "min_replicas": 1, "max_replicas": 4, "exact_audio": True})
    assert type(app).__name__ == "Application"
    with pytest.raises(SystemExit):  # argparse: an unknown option
        build_app({"no_such_option": 1})


def test_the_serve_configs_in_the_docs_build():
    """docs/scaling.md's Serve config and KubeRay sketch name our builder with options it accepts."""
    import re

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text()
    configs = []
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        document = yaml.safe_load(block)
        if document.get("kind") == "RayService":
            document = yaml.safe_load(document["spec"]["serveConfigV2"])
        configs.append(document)
    assert len(configs) == 2
    for config in configs:
        (application,) = config["applications"]
        assert application["import_path"] == "openchroma.serving.ray_app:build_app"
        assert type(build_app(application["args"])).__name__ == "Application"


# ----------------------------------------------------------------------------------------------------------------------
# On a local Ray cluster
# ----------------------------------------------------------------------------------------------------------------------


def test_seeded_answers_equal_the_library_and_the_single_process_server(cluster, local):
    voice, _ = create_voice(cluster.url, wav_bytes(0.8, 440.0), "good morning")
    # streamed chat (SSE through Ray's streaming responses) == model.stream(seed=...)
    with httpx.stream("POST", cluster.url + "/v1/chat/completions", json=chat_body(voice, 5, seed=1234),
                      timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        transcript, pcm, reason, error, done = read_chat_stream(sse_events(response.iter_lines()))
    assert (reason, error, done) == ("length", None, True)
    processor = local.app.state.engine.processor
    inputs = processor([{"role": "user", "content": [{"type": "text", "text": "Sing me a song."}]}])
    chunks = list(local.model.stream(**inputs, voice=cluster.voices.get(voice), max_new_tokens=5, chunk_frames=(2,),
                                     do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=1234))
    expected = torch.cat([c.pcm[0] for c in chunks]).numpy()
    assert pcm == (np.clip(expected, -1, 1) * 32767).astype("<i2").tobytes()
    assert transcript == processor.decode(torch.cat([c.text_ids[0] for c in chunks]))

    # speech, a whole chat answer (JSON) and errors: the same bytes as the single-process server
    requests = [
        ("/v1/audio/speech", {"input": "Hello there", "voice": voice, "response_format": "wav", "seed": 7,
                              "temperature": 0.7, "max_audio_frames": 4}),
        ("/v1/audio/speech", {"input": "Hello there", "response_format": "flac", "max_audio_frames": 3}),
        ("/v1/chat/completions", chat_body("default", 3, seed=5, stream=False)),
        ("/v1/audio/speech", {"input": "Hi", "voice": "voice_missing"}),  # 400 voice_not_found
        ("/v1/audio/speech", {"input": "Hi", "max_audio_frames": 601}),  # over the limit
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}),  # 404
        ("/v1/chat/completions", {"messages": []}),
    ]
    for path, body in requests:
        remote = httpx.post(cluster.url + path, json=body, timeout=120)
        single = local_post(local, path, json=body)
        assert (remote.status_code, remote.headers["content-type"]) == (single.status_code,
                                                                         single.headers["content-type"]), path
        if path == "/v1/chat/completions" and remote.status_code == 200:
            remote_message, single_message = remote.json()["choices"][0]["message"], single.json()["choices"][0][
                "message"]
            assert remote_message["content"] == single_message["content"]
            assert remote_message["audio"]["data"] == single_message["audio"]["data"]
        else:
            assert remote.content == single.content, (path, remote.text[:200])
    too_large = httpx.post(cluster.url + "/v1/audio/speech", content=b"x" * (1024 * 1024 + 1),
                           headers={"content-type": "application/json"}, timeout=60)
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"
    assert httpx.get(cluster.url + "/v1/nowhere").json()["error"]["code"] == "not_found"


def test_previous_answers_and_disconnects_across_replicas(cluster):
    """An answer's audio id works in a later turn on either replica; a client that hangs up mid-stream frees its
    row on the replica that served it (as the single-process server does)."""
    reply = httpx.post(cluster.url + "/v1/chat/completions", json=chat_body("default", 2, stream=False), timeout=120)
    first, audio_id = reply.headers["x-openchroma-replica"], reply.json()["choices"][0]["message"]["audio"]["id"]
    follow_up = chat_body("default", 2, stream=False)
    follow_up["messages"] += [{"role": "assistant", "audio": {"id": audio_id}},
                              {"role": "user", "content": "And then?"}]
    replicas = set()
    for _ in range(40):  # balanced at random: until the other replica has answered too (missed 40 times: 2**-40)
        response = httpx.post(cluster.url + "/v1/chat/completions", json=follow_up, timeout=120)
        assert response.status_code == 200, response.text
        replicas.add(response.headers["x-openchroma-replica"])
        if len(replicas - {first}):
            break
    assert replicas - {first}

    context, response, _ = open_stream(cluster.url, chat_body("default", 600, seed=3))
    replica = response.headers["x-openchroma-replica"]
    context.__exit__(None, None, None)  # hang up after the first audio delta
    deadline = time.time() + 120
    while True:
        health = httpx.get(cluster.url + "/health", timeout=60)
        if health.headers["x-openchroma-replica"] == replica and health.json().get("cancelled_total", 0) >= 1:
            break
        assert time.time() < deadline, "the replica did not cancel the abandoned generation"
        time.sleep(0.2)
    assert health.json()["active_rows"] == 0
    assert health.json()["frames_total"] < 600  # stopped long before the end (600 frames)


def open_stream(url, body):
    """A streaming chat request left open after its first audio delta: (context manager, response, line iterator)."""
    context = httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120)
    response = context.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    for line in lines:
        if '"data"' in line:  # the first audio delta: the replica is generating
            break
    return context, response, lines


def realtime_session_on(url, replica: str, attempts: int = 16):
    """An open realtime session (its session.created read) on `replica`; sessions are balanced at random between
    equally busy replicas, so try until one lands there (missed 16 times: 2**-16)."""
    from websockets.sync.client import connect

    for _ in range(attempts):
        session = connect(url.replace("http", "ws") + "/v1/realtime?model=chroma-tiny", open_timeout=120)
        assert json.loads(session.recv(timeout=120))["type"] == "session.created"
        if session.response.headers["x-openchroma-replica"] == replica:
            return session
        session.close()
    raise AssertionError(f"no realtime session landed on replica {replica}")


def replica_actor_names():
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#ChromaReplica#")}


def test_killing_a_replica_mid_stream(cluster, local):
    """Stream on each replica; kill the one that encoded an uploaded voice: its stream ends with a clean error
    event, the other stream completes, new requests (with that voice) are served by the survivor, and Ray starts a
    replacement that lists the voice and answers."""
    voice, creator = create_voice(cluster.url, wav_bytes(0.7, 260.0), "a voice to keep")
    streams = {}
    for _ in range(8):  # power of two choices: the second stream lands on the idle replica
        opened = open_stream(cluster.url, chat_body("default", LONG_FRAMES, seed=11))
        replica = opened[1].headers["x-openchroma-replica"]
        if replica in streams:
            opened[0].__exit__(None, None, None)
        else:
            streams[replica] = opened
        if len(streams) == 2:
            break
    assert set(streams) >= {creator} and len(streams) == 2
    survivor = next(name for name in streams if name != creator)
    session = realtime_session_on(cluster.url, creator)
    before = replica_actor_names()

    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#ChromaReplica#{creator}", namespace="serve"), no_restart=True)

    context, _, lines = streams[creator]
    _, _, reason, error, done = read_chat_stream(sse_events(lines))
    context.__exit__(None, None, None)
    assert error is not None and error["code"] == "replica_unavailable" and done and reason is None
    event = json.loads(session.recv(timeout=120))  # the realtime session on that replica: an error, then closed
    assert event["type"] == "error" and event["error"]["code"] == "replica_unavailable"
    with pytest.raises(ConnectionClosed):
        session.recv(timeout=120)
    assert session.close_code == 1011

    # new requests, while Ray replaces the dead replica: served, and the uploaded voice works elsewhere
    for seed in (1, 2, 3):
        response = httpx.post(cluster.url + "/v1/audio/speech", timeout=120, json={
            "input": "still here", "voice": voice, "response_format": "pcm", "seed": seed, "temperature": 0.9,
            "max_audio_frames": 3})
        assert response.status_code == 200, response.text
        assert response.headers["x-openchroma-replica"] != creator
        assert len(response.content) == 3 * FRAME_SAMPLES * 2

    context, _, lines = streams[survivor]  # nothing lost on the survivor: its answer is complete
    _, pcm, reason, error, done = read_chat_stream(sse_events(lines))
    context.__exit__(None, None, None)
    assert (reason, error, done) == ("length", None, True)

    deadline = time.time() + 300
    while not (replica_actor_names() - before and running_replicas() == 2):
        assert time.time() < deadline, "Ray did not replace the killed replica"
        time.sleep(1)
    replacement = next(iter(replica_actor_names() - before)).rsplit("#", 1)[1]
    served = served_by(cluster.url, replacement)
    assert voice in [info["id"] for info in served["voices"]] and served["health"]["worker_alive"]
    assert served["speech"].status_code == 200 and len(served["speech"].content) == 2 * FRAME_SAMPLES * 2


def running_replicas() -> int:
    return serve.status().applications[APP_NAME].deployments["ChromaReplica"].replica_states.get("RUNNING", 0)


def served_by(url, replica: str, attempts: int = 40) -> dict:
    """Requests without a voice key are balanced at random between idle replicas: repeat until `replica` answered
    each kind (the chance of missing it 40 times is 2**-40)."""
    found = {}
    for _ in range(attempts):
        if "voices" not in found:
            response = httpx.get(url + "/v1/audio/voices", timeout=60)
            if response.headers["x-openchroma-replica"] == replica:
                found["voices"] = response.json()["data"]
        if "health" not in found:
            response = httpx.get(url + "/health", timeout=60)
            if response.headers["x-openchroma-replica"] == replica:
                found["health"] = response.json()
        if "speech" not in found:
            response = httpx.post(url + "/v1/audio/speech", timeout=120, json={
                "input": "new replica", "response_format": "pcm", "max_audio_frames": 2})
            if response.headers.get("x-openchroma-replica") == replica:
                found["speech"] = response
        if len(found) == 3:
            return found
    raise AssertionError(f"replica {replica} answered only {sorted(found)}")


def test_realtime_session_runs_on_one_replica(cluster, local):
    """/v1/realtime through the ingress: one replica serves the whole session (its conversation persists between
    turns), and a seeded answer equals `model.stream` for the same conversation and voice."""
    from websockets.sync.client import connect

    instructions = "You are a helpful voice assistant."
    events = []
    with connect(cluster.url.replace("http", "ws") + "/v1/realtime?model=chroma-tiny",
                                 open_timeout=120) as socket_:
        assert socket_.response.headers["x-openchroma-replica"]
        assert json.loads(socket_.recv(timeout=120))["type"] == "session.created"
        socket_.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "instructions": instructions, "output_modalities": ["audio"],
            "audio": {"input": {"turn_detection": None}, "output": {"voice": "default"}},
            "max_output_tokens": 5, "temperature": 0.8, "top_p": 0.9, "seed": 99}}))
        receive_event(socket_, "session.updated", events)
        socket_.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "id": "item_first",
            "content": [{"type": "input_text", "text": "Hello!"}]}}))
        socket_.send(json.dumps({"type": "response.create"}))
        done = receive_event(socket_, "response.done", events)
        for _ in range(3):  # later events of the same session find the first turn: the same replica holds it
            socket_.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "item_first"}))
            assert receive_event(socket_, "conversation.item.retrieved", events)["item"]["id"] == "item_first"
    mine = [e for e in events if e.get("response_id") == done["response"]["id"]]
    pcm = b"".join(base64.b64decode(e["delta"]) for e in mine if e["type"] == "response.output_audio.delta")
    transcript = "".join(e["delta"] for e in mine if e["type"] == "response.output_audio_transcript.delta")

    processor = local.app.state.engine.processor
    conversation = [{"role": "system", "content": instructions},
                    {"role": "user", "content": [{"type": "text", "text": "Hello!"}]}]
    chunks = list(local.model.stream(**processor(conversation), voice=cluster.voices.get("default"),
                                     max_new_tokens=5, chunk_frames=(2,), do_sample=True, temperature=0.8, top_p=0.9,
                                     top_k=50, seed=99))
    expected = torch.cat([c.pcm[0] for c in chunks]).numpy()
    assert pcm == (np.clip(expected, -1, 1) * 32767).astype("<i2").tobytes()
    assert transcript == processor.decode(torch.cat([c.text_ids[0] for c in chunks]), skip_special_tokens=True)


def receive_event(socket_, wanted: str, seen: list) -> dict:
    while True:
        event = json.loads(socket_.recv(timeout=120))
        seen.append(event)
        assert event["type"] != "error", event
        if event["type"] == wanted:
            return event
