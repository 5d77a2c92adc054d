# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""The OpenAI-compatible server on Ray Serve: many model replicas (GPUs, machines) behind one endpoint.

Not a hub file; needs the `ray` extra (`pip install 'openchroma[ray]'`). docs/scaling.md is the user guide.

Two deployments::

    HTTP ──> Ray's proxy ──> ChromaIngress (FastAPI, no model)      body limit + API key (GuardMiddleware),
                              │  one streaming handle call per request, routed by voice (model multiplexing)
                              v
                             ChromaReplica × N (model + ChromaEngine)  the single-process app (`create_app`) runs the
                                                                       request in the replica: the same parsing,
                                                                       validation, limits, errors and batching

A replica runs each HTTP request through the unchanged single-process app in its own process (`run_asgi`) and
streams the ASGI messages back: first a marker naming the replica, then {"status", "headers"}, then body pieces.
The ingress relays them (a Ray streaming response), so SSE deltas and chunked audio reach the client as the
engine produces them; continuous batching happens inside each replica. A realtime WebSocket session is one
streaming call too (`run_websocket`), so it stays on one replica; the client's messages reach it through a Ray
queue created for the session.

Voices and answers' audio ids live in a folder every replica reads (`SharedVoiceStore`, `SharedAnswerMemory`; a
network filesystem across machines). Requests naming an uploaded voice carry it as Ray Serve's multiplexed model
id, so they go to a replica that already holds that voice and its cached backbone prefix; the default voice,
per-request reference voices and other requests are balanced over all replicas (power of two choices).

A replica that dies: requests it held get a clean error (503 JSON, an SSE error event once streaming, a realtime
error event and close 1011), requests not yet taken by it are retried on another replica, and Ray starts a
replacement.
"""

import argparse
import asyncio
import collections
import json
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import ray
import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.util.queue import Queue

from ..voice_chroma import ChromaVoice
from .app import (
    GuardMiddleware, add_error_handlers, add_serve_arguments, create_app, engine_from_args, register_voice_file,
    settings_from_args, sse,
)
from .realtime import realtime_settings
from .realtime.events import error_event, new_id
from .schemas import VOICE_ID_PATTERN, APIError, error_body


logger = logging.getLogger("openchroma.server.ray")

APP_NAME = "openchroma"
VOICES_PER_REPLICA = 64  # voices (and their backbone prefix caches) a replica keeps in memory; more reload from disk
# the single-process server's routes, served by the ingress: (path, methods)
ROUTES = (
    ("/v1/chat/completions", ["POST"]),
    ("/v1/audio/speech", ["POST"]),
    ("/v1/audio/voices", ["GET", "POST"]),
    ("/v1/audio/voices/{voice_id}", ["GET", "DELETE"]),
    ("/v1/models", ["GET"]),
    ("/v1/models/{model_id:path}", ["GET"]),
    ("/health", ["GET"]),
    ("/", ["GET"]),  # the voice-chat page (it talks to /v1/realtime)
    ("/static/{name:path}", ["GET"]),
)
GENERATION_PATHS = ("/v1/chat/completions", "/v1/audio/speech")


# ----------------------------------------------------------------------------------------------------------------------
# What every replica shares, in one folder: voices (an LRU of loaded ones per replica) and answers' audio ids
# ----------------------------------------------------------------------------------------------------------------------


class SharedVoiceStore:
    """`VoiceStore`'s interface (add/get/info/list/delete) over a folder that several processes use at once.

    The folder is the truth: a voice is <id>.safetensors + <id>.json, both written to a temporary name and renamed
    (the .json last), so another replica sees a voice whole or not at all. `get` returns the same `ChromaVoice`
    object while the files are unchanged (it carries the voice's cached backbone prefix), keeping at most
    `capacity` voices in memory.
    """

    def __init__(self, folder, capacity: int = VOICES_PER_REPLICA):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self._loaded = collections.OrderedDict()  # id -> (stamp of the .json, ChromaVoice), least recent first
        self._lock = threading.Lock()

    def _path(self, voice_id: str, suffix: str) -> Optional[Path]:
        if not isinstance(voice_id, str) or not VOICE_ID_PATTERN.match(voice_id):
            return None  # never build a file name from an unchecked string
        return self.folder / f"{voice_id}{suffix}"

    def add(self, voice: ChromaVoice, info: dict) -> dict:
        voice_id = info["id"]
        if self._path(voice_id, ".json") is None:
            raise ValueError(f"invalid voice id {voice_id!r}")
        temporary = f".{voice_id}.{secrets.token_hex(4)}.tmp"
        voice.save(self.folder / temporary)
        os.replace(self.folder / temporary, self._path(voice_id, ".safetensors"))
        (self.folder / temporary).write_text(json.dumps(info, indent=2))
        os.replace(self.folder / temporary, self._path(voice_id, ".json"))
        return info

    def info(self, voice_id: str) -> Optional[dict]:
        path = self._path(voice_id, ".json")
        try:
            return json.loads(path.read_text()) if path is not None else None
        except (OSError, ValueError):
            return None

    def get(self, voice_id: str) -> Optional[ChromaVoice]:
        path = self._path(voice_id, ".json")
        try:
            stamp = path.stat().st_mtime_ns if path is not None else None
        except OSError:
            stamp = None
        with self._lock:
            if stamp is None:  # unknown, or deleted by another replica
                self._loaded.pop(voice_id, None)
                return None
            if voice_id in self._loaded and self._loaded[voice_id][0] == stamp:
                self._loaded.move_to_end(voice_id)
                return self._loaded[voice_id][1]
        try:
            voice = ChromaVoice.load(self._path(voice_id, ".safetensors"))
        except (OSError, ValueError) as error:
            logger.warning("cannot load voice %r: %s", voice_id, error)
            return None
        with self._lock:
            self._loaded[voice_id] = (stamp, voice)
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
        return voice

    def list(self) -> List[dict]:
        infos = [self.info(path.stem) for path in self.folder.glob("*.json")]
        return sorted((i for i in infos if i is not None), key=lambda info: info.get("created_at", 0))

    def delete(self, voice_id: str) -> bool:
        path = self._path(voice_id, ".json")
        if path is None or not path.exists():
            return False
        path.unlink(missing_ok=True)  # the .json first: the voice disappears for everyone at once
        self._path(voice_id, ".safetensors").unlink(missing_ok=True)
        with self._lock:
            self._loaded.pop(voice_id, None)
        return True


class SharedAnswerMemory:
    """`AnswerMemory`'s interface over a shared folder: a later turn may reference an earlier answer's audio id
    ({"audio": {"id": ...}}) whichever replica produced it. One small file per answer, removed once expired."""

    ID_PATTERN = re.compile(r"^audio_[0-9a-f]{24}$")

    def __init__(self, folder, ttl_s: int):
        self.folder, self.ttl_s = Path(folder), ttl_s
        self.folder.mkdir(parents=True, exist_ok=True)
        self._puts = 0

    def new_id(self) -> tuple:
        return f"audio_{secrets.token_hex(12)}", int(time.time()) + self.ttl_s

    def put(self, audio_id: str, expires_at: int, transcript: str):
        if not self.ID_PATTERN.match(audio_id):
            raise ValueError(f"invalid audio id {audio_id!r}")
        temporary = self.folder / f".{audio_id}.tmp"
        temporary.write_text(json.dumps({"transcript": transcript, "expires_at": expires_at}))
        os.replace(temporary, self.folder / f"{audio_id}.json")
        self._puts += 1
        if self._puts % 100 == 0:
            self.remove_expired()

    def transcript(self, audio_id: str) -> Optional[str]:
        if not isinstance(audio_id, str) or not self.ID_PATTERN.match(audio_id):
            return None
        try:
            item = json.loads((self.folder / f"{audio_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return item["transcript"] if item.get("expires_at", 0) > time.time() else None

    def remove_expired(self):
        for path in self.folder.glob("audio_*.json"):
            try:
                if json.loads(path.read_text()).get("expires_at", 0) <= time.time():
                    path.unlink(missing_ok=True)
            except (OSError, ValueError):
                continue


# ----------------------------------------------------------------------------------------------------------------------
# One HTTP request through an ASGI app in this process, its response as a stream of items
# ----------------------------------------------------------------------------------------------------------------------


def http_scope(call: dict) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": call["method"], "scheme": "http", "path": call["path"], "raw_path": call["path"].encode(),
            "query_string": call["query"], "root_path": "", "headers": call["headers"], "client": call["client"],
            "server": None, "state": {}}


async def run_asgi(app, call: dict):
    """Run `call` (method, path, query, headers, body, client) through `app`; yield {"status", "headers"} once, then
    the body's pieces (bytes). Closing the generator tells the app that the client went away."""
    messages = asyncio.Queue()
    body_sent, gone = False, asyncio.Event()

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call["body"], "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        messages.put_nowait(message)

    task = asyncio.create_task(app(http_scope(call), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while True:
            message = await messages.get()
            if message is None:  # the app returned without completing its response
                task.result()
                raise RuntimeError("the app ended without a complete response")
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": [(k.decode("latin-1"), v.decode("latin-1"))
                                                                for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()  # the app's disconnect checks now see the client gone: its generation is cancelled
        if not task.done():
            task.cancel()


def websocket_scope(call: dict) -> dict:
    scope = dict(http_scope(dict(call, method="GET")), type="websocket", scheme="ws", subprotocols=call["subprotocols"])
    del scope["method"]
    return scope


async def run_websocket(app, call: dict, inbox: Queue):
    """Run a WebSocket session through `app`: the client's ASGI messages arrive through `inbox` (a Ray queue the
    ingress fills); yield the app's messages (websocket.accept / send / close). Closing the generator ends it."""
    messages = asyncio.Queue()
    connected = False

    async def receive():
        nonlocal connected
        if not connected:
            connected = True
            return {"type": "websocket.connect"}
        try:
            return await inbox.get_async()
        except RayError:  # the ingress holding the client's socket is gone
            return {"type": "websocket.disconnect", "code": 1006}

    async def send(message):
        messages.put_nowait(message)

    task = asyncio.create_task(app(websocket_scope(call), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while True:
            message = await messages.get()
            if message is None:
                task.result()
                return
            yield message
    finally:
        if not task.done():
            task.cancel()


# ----------------------------------------------------------------------------------------------------------------------
# The deployments
# ----------------------------------------------------------------------------------------------------------------------


@serve.deployment(name="ChromaReplica", health_check_period_s=5)
class ChromaReplica:
    """One model replica: the model, its `ChromaEngine` (continuous batching) and the single-process app."""

    def __init__(self, options: dict):
        options = argparse.Namespace(**options)
        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        from ..cli import load_model  # the CLI's loader: the tiny random model without --model

        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, options.dtype or ("bfloat16" if device == "cuda" else "float32"))
        model, processor = load_model(options.model, device, dtype, options.trust_remote_code,
                                       getattr(options, "quantize", None))
        self.voices = SharedVoiceStore(options.voices_dir)
        for voice_id, audio_path, transcript_path in options.register_voice:
            if self.voices.info(voice_id) is None:  # another replica may have registered it already
                register_voice_file(model, processor, self.voices, voice_id, audio_path, transcript_path)
        settings = settings_from_args(options)
        if settings.default_voice is not None and self.voices.get(settings.default_voice) is None:
            raise ValueError(f"--default-voice {settings.default_voice!r} is not a registered voice")
        self.engine = engine_from_args(model, processor, options)
        self.engine.start()
        self.app = create_app(self.engine, settings, self.voices)
        answers = SharedAnswerMemory(Path(options.voices_dir) / "answers", settings.audio_ttl_s)
        self.app.state.answers = self.app.state.builder.answers = answers  # audio ids work across replicas
        self.app.state.realtime = realtime_settings(options, settings.max_audio_seconds)  # limits per replica
        self.name = serve.get_replica_context().replica_tag

    @serve.multiplexed(max_num_models_per_replica=VOICES_PER_REPLICA)
    async def voice(self, voice_id: str) -> Optional[ChromaVoice]:
        """Ray's per-replica record of the voices this replica holds (what routes a voice's requests here)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.voices.get, voice_id)

    async def handle(self, call: dict):
        """One HTTP request: yields {"replica": name}, then what `run_asgi` yields."""
        voice_id = serve.get_multiplexed_model_id()
        if voice_id:
            await self.voice(voice_id)
        yield {"replica": self.name}
        async for item in run_asgi(self.app, call):
            yield item

    async def realtime(self, call: dict, inbox: Queue):
        """One realtime WebSocket session, whole on this replica: yields {"replica": name}, then the app's messages."""
        yield {"replica": self.name}
        async for message in run_websocket(self.app, call, inbox):
            yield message

    def check_health(self):
        """Ray calls this periodically; a replica whose generation worker died is replaced."""
        if not self.engine.alive:
            raise RuntimeError("the generation worker is not running")

    def __del__(self):
        self.engine.stop()


def routing_key(path: str, body: bytes, default_voice: Optional[str]) -> str:
    """The uploaded voice a generation request names ('' when none): Ray routes it to a replica holding that voice.
    The default voice, OpenAI's built-in names and per-request reference recordings get '' (balanced routing)."""
    if path not in GENERATION_PATHS:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""  # the replica answers with the proper 400
    if not isinstance(data, dict) or data.get("prompt_audio") or data.get("ref_audio"):
        return ""
    if path == "/v1/audio/speech":
        voice = data.get("voice")
    else:
        audio = data.get("audio")
        voice = audio.get("voice") if isinstance(audio, dict) else None
    if isinstance(voice, dict):  # {"id": ...}
        voice = voice.get("id")
    if not isinstance(voice, str) or voice == default_voice or not VOICE_ID_PATTERN.match(voice):
        return ""
    return voice


class ReplicaGone(Exception):
    """The replica serving a request stopped (died, or was unreachable)."""


@serve.deployment(name="ChromaIngress", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class ChromaIngress:
    """The HTTP entry: the single-process server's routes, each relayed to a replica as one streaming call."""

    def __init__(self, replicas, options: dict):
        self.replicas = replicas
        self.settings = settings_from_args(argparse.Namespace(**options))
        self.retries = 2  # extra attempts for a request that no replica took (the chosen one had just died)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="OpenChroma on Ray Serve")
        app.add_middleware(GuardMiddleware, settings=self.settings)
        add_error_handlers(app)
        for path, methods in ROUTES:
            app.add_api_route(path, self.forward, methods=methods, include_in_schema=False)
        app.add_api_websocket_route("/v1/realtime", self.realtime)
        return app

    async def forward(self, request: Request):
        body = await request.body()  # bounded by GuardMiddleware
        path = request.url.path
        call = {"method": request.method, "path": path, "query": request.url.query.encode(),
                "headers": request.headers.raw, "body": body,
                "client": (request.client.host, request.client.port) if request.client else None}
        stream, replica = await self.open(call, routing_key(path, body, self.settings.default_voice))
        try:
            head = await anext_or_gone(stream)
        except ReplicaGone:
            raise replica_unavailable() from None
        headers = {k: v for k, v in head["headers"] if k.lower() != "content-length"}
        headers["x-openchroma-replica"] = replica
        if "content-length" not in {k.lower() for k, _ in head["headers"]}:  # a stream (SSE, chunked audio)
            return StreamingResponse(self.relay(stream, path), status_code=head["status"], headers=headers)
        try:  # a complete body (JSON, a whole audio file): collected here so a failure still gets a status code
            content = b"".join([piece async for piece in relay_pieces(stream)])
        except ReplicaGone:
            raise replica_unavailable() from None
        return Response(content, status_code=head["status"], headers=headers)

    async def open(self, call: dict, voice_id: str, method: str = "handle", *extra):
        """-> (response stream, replica name): a replica has taken the request. Retries on another replica when the
        chosen one died before taking it."""
        for attempt in range(self.retries + 1):
            handle = self.replicas.options(stream=True, multiplexed_model_id=voice_id)
            stream = getattr(handle, method).remote(call, *extra)
            try:
                marker = await anext_or_gone(stream)
                return stream, marker["replica"]
            except ReplicaGone as error:
                logger.warning("no replica took the request (attempt %d): %s", attempt + 1, error)
        raise replica_unavailable()

    async def relay(self, stream, path: str):
        """The replica's body pieces; if it dies mid-stream, SSE gets an error event (then [DONE] for chat, as the
        single-process server ends a failed stream) and a raw audio body ends early."""
        try:
            async for piece in relay_pieces(stream):
                yield piece
        except ReplicaGone as error:
            logger.warning("replica stopped mid-stream: %s", error)
            if path in GENERATION_PATHS:
                problem = replica_unavailable()
                yield sse(error_body(problem.message, problem.type, problem.param, problem.code))
                if path == "/v1/chat/completions":
                    yield sse("[DONE]")
        finally:
            stream.cancel()  # no-op when complete; a client that left cancels the replica's generation

    async def realtime(self, websocket: WebSocket):
        """/v1/realtime: the whole session on one replica (one streaming call); the client's messages reach it
        through a Ray queue, its messages come back as the call's stream."""
        await websocket.receive()  # websocket.connect
        inbox = Queue(maxsize=1024, actor_options={"num_cpus": 0})
        call = {"path": websocket.url.path, "query": websocket.url.query.encode(), "headers": websocket.headers.raw,
                "client": (websocket.client.host, websocket.client.port) if websocket.client else None,
                "subprotocols": list(websocket.scope.get("subprotocols") or [])}
        pump = None
        try:
            stream, replica = await self.open(call, "", "realtime", inbox)
            pump = asyncio.create_task(client_to_inbox(websocket, inbox))
            async for message in relay_pieces(stream):
                if message["type"] == "websocket.accept":
                    message = dict(message, headers=list(message.get("headers") or [])
                                   + [(b"x-openchroma-replica", replica.encode())])
                await websocket.send(message)
        except (APIError, ReplicaGone) as error:
            logger.warning("realtime session ended by its replica: %s", error)
            await close_with_error(websocket, replica_unavailable())
        finally:
            if pump is not None:
                pump.cancel()
            ray.kill(inbox.actor)


async def client_to_inbox(websocket: WebSocket, inbox: Queue):
    while True:
        message = await websocket.receive()
        await inbox.put_async(message)
        if message["type"] == "websocket.disconnect":
            return


async def close_with_error(websocket: WebSocket, problem: APIError):
    """A realtime error event, then close (1011), on a socket that may or may not be accepted yet."""
    try:
        if websocket.application_state.name == "CONNECTING":
            await websocket.accept()
        await websocket.send_json({**error_event(problem.message, problem.type, problem.code, problem.param),
                                   "event_id": new_id("event")})
        await websocket.close(code=1011, reason="model replica unavailable")
    except (RuntimeError, OSError):  # the client is gone already
        pass


async def anext_or_gone(stream):
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        raise ReplicaGone("the replica ended the response early") from None
    except (RayActorError, ActorUnavailableError) as error:
        raise ReplicaGone(str(error).splitlines()[0] if str(error) else type(error).__name__) from None


async def relay_pieces(stream):
    while True:
        try:
            yield await stream.__anext__()
        except StopAsyncIteration:
            return
        except (RayActorError, ActorUnavailableError) as error:
            raise ReplicaGone(type(error).__name__) from None


def replica_unavailable() -> APIError:
    return APIError(503, "The model replica serving this request stopped; retry the request.", type="server_error",
                    code="replica_unavailable")


# ----------------------------------------------------------------------------------------------------------------------
# Building the application: `openchroma serve --ray ...` and `serve run openchroma.serving.ray_app:build_app ...`
# ----------------------------------------------------------------------------------------------------------------------


def application(options: argparse.Namespace):
    """`openchroma serve` options -> the Ray Serve application (ingress bound to the replica deployment)."""
    plain = {k: v for k, v in vars(options).items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    plain = absolute_paths(plain)
    gpus = options.replica_gpus
    if gpus is None:
        gpus = 1 if options.device == "cuda" or (options.device is None and torch.cuda.is_available()) else 0
    replica = {"ray_actor_options": {"num_cpus": options.replica_cpus, "num_gpus": gpus},
               "max_ongoing_requests": options.max_active_rows,
               "graceful_shutdown_timeout_s": options.drain_seconds}  # a replica stopped by Ray finishes answers
    if options.min_replicas is not None or options.max_replicas is not None:
        low = options.min_replicas if options.min_replicas is not None else 1
        replica["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": max(low, options.max_replicas or low),
            "initial_replicas": max(low, min(options.replicas, options.max_replicas or options.replicas)),
            "target_ongoing_requests": options.max_batch_size,
        }
    else:
        replica["num_replicas"] = options.replicas
    replicas = ChromaReplica.options(**replica).bind(plain)
    return ChromaIngress.bind(replicas, plain)


def absolute_paths(options: dict) -> dict:
    """Replicas may run in another working directory (or machine): local paths are made absolute."""
    options = dict(options)
    options["voices_dir"] = os.path.abspath(os.path.expanduser(options["voices_dir"]))
    options["allow_dir"] = [os.path.abspath(d) for d in options.get("allow_dir") or []]
    options["register_voice"] = [[v, os.path.abspath(a), os.path.abspath(t)]
                                 for v, a, t in options.get("register_voice") or []]
    if options.get("model") and os.path.isdir(options["model"]):
        options["model"] = os.path.abspath(options["model"])
    return options


def build_app(args: Dict[str, object]):
    """The application builder for `serve run` and Serve config files: `args` are `openchroma serve` options by
    their long names (e.g. {"replicas": 2, "model": "FlashLabs/Chroma-4B", "register_voice": [[id, wav, txt]]})."""
    argv = ["--ray"]
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True or (isinstance(value, str) and value.lower() == "true"):
            argv.append(flag)
        elif value is False or value is None or (isinstance(value, str) and value.lower() == "false"):
            continue
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, *map(str, item)] if isinstance(item, (list, tuple)) else [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return application(add_serve_arguments(argparse.ArgumentParser(prog="openchroma serve")).parse_args(argv))


def serve_ray(args: argparse.Namespace) -> int:
    """`openchroma serve --ray`: connect to (or start) a Ray cluster, run the application until interrupted."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ray.init(address=args.ray_address, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        logger.info("serving on http://%s:%d through Ray Serve (%s)", args.host, args.port,
                    f"{args.min_replicas}-{args.max_replicas} replicas" if args.max_replicas else
                    f"{args.replicas} replica(s)")
        serve.run(application(args), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
