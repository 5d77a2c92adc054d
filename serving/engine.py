# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""The generation engine of the server: one worker thread owns the model.

Continuous batching (`ChromaEngine`): requests wait in one FIFO queue. There is one running batch. Between two
frames the worker prefills the requests that arrived (one batched `ChromaGenerator.start`, up to max_batch_size),
runs their first frame, and merges their state into the running batch (`batching_chroma.merge_states`: each row's
caches move in as left padding, so its answer does not change), after one more frame on their own when they are
off the batch's text schedule. From the next frame on they share every decode step; rows that finish leave the
batch at once (`batching_chroma.select_rows`).

Prefill groups: requests are prefilled together only while their padded prompts stay within max_prefill_tokens
(rows x longest prompt); a longer prompt is prefilled alone, so one long prompt never pads others into quadratic
attention memory (`prefill_groups`).

Draining (`begin_drain`, SIGTERM): new requests get 503; after the drain time every request still queued or
running ends with an error event, so its client knows.

Per-row behaviour, so that a request's output never depends on its neighbours:
    * sampling: every row has its own `SamplingParams` and its own `torch.Generator` (`RowSamplingGenerator`), seeded
      with the request's `seed` (or a random one); its draws are exactly those of `model.generate(seed=...)` alone;
    * limits: audio frames, text tokens, text-only answers and cancellation end single rows (`RowLimits`);
    * a client that disconnects sets its row's cancel flag: the row ends after the current frame and leaves the
      batch, freeing its slot;
    * audio: the engine decodes the codes with the streaming Mimi decoder, batched (a row's samples may differ
      from its solo run by float rounding, at most 1 LSB of 16-bit PCM) or, with `exact_audio`, row by row at the
      row's own chunk boundaries (bit-identical to the solo run). Codes and text are identical either way.

Not a hub file (needs the `server` extra).
"""

import asyncio
import collections
import logging
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional

import torch

from ..generation_chroma import ChromaGenerator
from ..batching_chroma import merge_states, select_rows
from ..sampling_chroma import SamplingParams, sample_rows
from ..voice_chroma import ChromaVoice
from .schemas import APIError


logger = logging.getLogger("openchroma.server")

# the counters GET /health reports (docs/server.md lists them)
METRICS = ("requests_total", "batches_total", "joined_running_total", "frames_total", "completed_total",
           "cancelled_total", "errors_total")


# ----------------------------------------------------------------------------------------------------------------------
# The engine: one worker thread owns the model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationJob:
    """One request for the worker: a conversation's thinker inputs [1, S], a voice and limits.

    `sink` receives ("delta", text_ids, pcm float32 [n] or None) events, then ("done", finish_reason, frames,
    text_tokens) or ("error", http_status, message); it is called from the worker thread.
    """

    kind: Literal["chat", "speech"]
    thinker_inputs: Dict[str, torch.Tensor]
    sink: Callable[[tuple], None]
    voice: Optional[ChromaVoice] = None
    reference: Optional[tuple] = None  # (24 kHz waveform [T], transcript ids [P]) encoded on admission
    forced_text_ids: Optional[torch.Tensor] = None  # [N] speech: the text to speak
    max_frames: int = 1000
    max_text_tokens: Optional[int] = None
    sampling: SamplingParams = SamplingParams()
    seed: Optional[int] = None
    want_audio: bool = True
    cancel: threading.Event = field(default_factory=threading.Event)


class RowSamplingGenerator(ChromaGenerator):
    """A `ChromaGenerator` whose rows sample independently: row b draws with its own params and torch.Generator.

    One shared generator would make a row's draws depend on its neighbours (a [B, V] draw consumes the stream for
    every row). Here sampled rows go through `sample_rows`: each row draws [1, V] from its own generator and gets
    exactly what `model.generate(seed=...)` gives that request alone; greedy rows take the argmax together.
    """

    def __init__(self, model, row_sampling: List[SamplingParams], row_generators: List[Optional[torch.Generator]]):
        super().__init__(model)
        sampled = [b for b, p in enumerate(row_sampling) if p.do_sample]
        self.sampled_index = torch.tensor(sampled, dtype=torch.long, device=model.backbone_device_dtype()[0])
        self.sampled_params = [row_sampling[b] for b in sampled]
        self.sampled_generators = [row_generators[b] for b in sampled]

    def choose_code(self, logits, params):
        logits = logits[..., : self.config.codebook_size]  # never a special value: Mimi decodes every frame
        codes = logits.argmax(dim=-1)
        if self.sampled_params:
            drawn = sample_rows(logits[self.sampled_index], self.sampled_params, self.sampled_generators)
            codes = codes.index_put((self.sampled_index,), drawn)
        return codes


class RowLimits:
    """Stopping criterion ending single rows: frame limit, cancellation, text-only answers whose text is complete.
    It also applies per-row text limits (what `max_text_tokens` does for a whole batch), at the same point of the
    loop, so every row stops talking exactly where it would alone. Device tensors only: no host sync."""

    def __init__(self, jobs: List[GenerationJob], device):
        self.jobs = jobs
        self.max_frames = torch.tensor([j.max_frames for j in jobs], device=device)
        big = torch.iinfo(torch.long).max
        self.max_text = torch.tensor([j.max_text_tokens or big for j in jobs], device=device)
        self.text_only = torch.tensor([not j.want_audio for j in jobs], device=device)

    def __call__(self, state):
        state.thinker_alive = state.thinker_alive & (state.text_count < self.max_text)
        stop = (state.row_frames >= self.max_frames) | (self.text_only & ~state.thinker_alive)
        if any(job.cancel.is_set() for job in self.jobs):
            stop = stop | torch.tensor([job.cancel.is_set() for job in self.jobs], device=stop.device)
        return stop


@dataclass
class RunningBatch:
    """The rows decoding together: one generation state, advanced one frame at a time. Requests join it (their
    states merged in) and leave it (their rows dropped) between frames."""

    jobs: List[GenerationJob]
    state: Any  # ChromaGenerationState
    generators: List[Optional[torch.Generator]]  # per row: its sampling generator (None: greedy)
    codec_states: list  # one MimiStreamState for the whole batch, or one per row (exact_audio; None: no audio)
    runner: Any = None  # RowSamplingGenerator for these rows
    limits: Any = None  # RowLimits for these rows
    frames_since_emit: int = 0  # batched audio: frames since the whole batch was last delivered
    # per row: the answer is complete; text ids and audio frames sent so far; the last text id; frames generated;
    # output not yet delivered (codes [n, K] pieces, how many of those frames are the row's, text ids)
    ended: List[bool] = field(default_factory=list)
    text_counts: List[int] = field(default_factory=list)
    frame_counts: List[int] = field(default_factory=list)
    last_text: List[Optional[int]] = field(default_factory=list)
    row_frames: List[int] = field(default_factory=list)
    pending_codes: List[list] = field(default_factory=list)
    pending_valid: List[int] = field(default_factory=list)
    pending_text: List[list] = field(default_factory=list)
    finished: List[bool] = field(default_factory=list)

    ROW_FIELDS = ("jobs", "generators", "ended", "text_counts", "frame_counts", "last_text", "row_frames",
                  "pending_codes", "pending_valid", "pending_text", "finished")

    def __post_init__(self):
        n = len(self.jobs)
        self.ended, self.text_counts, self.frame_counts = [False] * n, [0] * n, [0] * n
        self.last_text, self.row_frames, self.pending_valid = [None] * n, [0] * n, [0] * n
        self.pending_codes, self.pending_text = [[] for _ in range(n)], [[] for _ in range(n)]
        self.finished = [False] * n

    @property
    def active(self) -> int:
        return len(self.jobs) - sum(self.ended)


class ChromaEngine:
    """Owns the model on one worker thread; see the module docstring for the scheduling.

    max_batch_size: requests prefilled together when they join; max_active_rows: rows decoding at once (the rest
    wait, FIFO); batch_window_s: when idle, how long the first request waits for others to join with it;
    chunk_frames: frames between deliveries of text and audio to the clients (the first entry);
    exact_audio: decode every row's audio on its own (a batch-of-one Mimi call per row and chunk), so a request's
        audio is bit-identical alone or under load. Batched decoding (the default) is faster; its rows differ from
        solo decoding by float re-association (|error| ~1e-6, at most 1 LSB of 16-bit PCM). The codes and text
        are identical either way.
    """

    def __init__(self, model, processor, max_batch_size: int = 16, max_active_rows: int = 64,
                 batch_window_s: float = 0.01, chunk_frames=(2,), exact_audio: bool = False,
                 max_prefill_tokens: int = 4096):
        self.model = model
        self.processor = processor
        self.audio_decoder = model.streaming_audio_decoder()
        self.exact_audio = exact_audio
        self.device = model.backbone_device_dtype()[0]
        self.max_batch_size = max_batch_size
        self.max_active_rows = max_active_rows
        self.batch_window_s = batch_window_s
        self.chunk_frames = tuple(chunk_frames)
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = collections.Counter(dict.fromkeys(METRICS, 0))  # /health shows every counter from the start
        self._pending = collections.deque()  # GenerationJob | (callable, Future), FIFO
        self._batch: Optional[RunningBatch] = None
        self._wake = threading.Condition()
        self._stopping = False
        self._draining = False  # begin_drain: no new requests
        self._abort = False  # the drain time is over: end every request
        self._thread = None

    # -- public (any thread) ---------------------------------------------------------------------------------------

    def start(self):
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="chroma-worker", daemon=True)
            self._thread.start()

    def stop(self):
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def begin_drain(self, seconds: float):
        """Stop taking requests; after `seconds`, end every request still queued or running with a 503 error."""
        with self._wake:
            if self._draining:
                return
            self._draining = True
        logger.info("draining: %.1f s for the answers in flight", seconds)
        timer = threading.Timer(seconds, self._abort_all)
        timer.daemon = True
        timer.start()

    def _abort_all(self):
        with self._wake:
            self._abort = True
            self._wake.notify_all()

    def submit(self, job: GenerationJob):
        with self._wake:
            if self._stopping or self._draining:
                raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
            self._pending.append(job)
            self.metrics["requests_total"] += 1
            self._wake.notify_all()

    def call(self, fn: Callable) -> Future:
        """Run fn(model) on the worker thread between decode steps (e.g. encoding a voice)."""
        future = Future()
        with self._wake:
            self._pending.append((fn, future))
            self._wake.notify_all()
        return future

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        with self._wake:
            queued = sum(isinstance(p, GenerationJob) for p in self._pending)
            active = self._batch.active if self._batch is not None else 0
            return {"queued": queued, "active_rows": active, "worker_alive": self.alive,
                    "draining": self._draining, **self.metrics}

    # -- worker thread -----------------------------------------------------------------------------------------------

    def _run(self):
        logger.info("worker started (joins of up to %d, %d active rows)", self.max_batch_size, self.max_active_rows)
        while True:
            with self._wake:
                while not self._pending and self._batch is None and not self._stopping and not self._abort:
                    self._wake.wait()
                if self._stopping:
                    break
                if self._abort:
                    self._end_everything("The server is shutting down.")
                    self._abort = False
                    continue
                if self._batch is None and self._pending and self.batch_window_s > 0:
                    self._wait_for_company()
                admitted = self._take_admissible()
            for item in admitted:
                if isinstance(item, tuple):
                    self._run_call(*item)
            jobs = [item for item in admitted if isinstance(item, GenerationJob)]
            for kind in ("chat", "speech"):  # one prefill is all free-talking or all forced-text (speech) rows
                group = [job for job in jobs if job.kind == kind]
                lengths = [job.thinker_inputs["thinker_input_ids"].shape[1] for job in group]
                for rows in prefill_groups(lengths, self.max_batch_size, self.max_prefill_tokens):
                    rows = [group[i] for i in rows]
                    try:
                        self._join(rows)
                    except Exception as error:
                        self._fail(rows, error)
            if self._batch is not None:
                try:
                    self._advance()
                except Exception as error:
                    batch = self._batch
                    self._fail([job for job, ended in zip(batch.jobs, batch.ended) if not ended], error)
                    with self._wake:
                        self._batch = None
        self._shutdown()

    def _fail(self, jobs, error):
        """An unexpected failure: the requests involved get a 500 (details in the log only), the worker carries on."""
        logger.error("generation failed for %d request(s)", len(jobs), exc_info=error)
        for job in jobs:
            job.sink(("error", 500, "Generation failed."))
        self.metrics["errors_total"] += len(jobs)

    def _wait_for_company(self):
        """Idle worker, first request in: wait up to batch_window_s for others (lock held by caller)."""
        deadline = time.monotonic() + self.batch_window_s
        while not self._stopping and len(self._pending) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.wait(remaining)

    def _take_admissible(self):
        """Pop pending items in FIFO order while rows are free (lock held by caller). A job that does not fit stops
        admission, so later requests never overtake it."""
        active = self._batch.active if self._batch is not None else 0
        admitted = []
        while self._pending:
            item = self._pending[0]
            if isinstance(item, GenerationJob):
                if active >= self.max_active_rows:
                    break
                active += 1
            admitted.append(self._pending.popleft())
        return admitted

    def _run_call(self, fn, future):
        if not future.set_running_or_notify_cancel():
            return
        try:
            with torch.no_grad():
                future.set_result(fn(self.model))
        except BaseException as error:  # handed to the waiting request
            future.set_exception(error)

    # -- joining, stepping, leaving ------------------------------------------------------------------------------------

    def _ready(self, jobs: List[GenerationJob]) -> List[GenerationJob]:
        """Drop jobs whose client left while queued; encode reference voices (a 400 for one that fails)."""
        ready = []
        for job in jobs:
            if job.cancel.is_set():
                self.metrics["cancelled_total"] += 1
                continue
            if job.voice is None and job.reference is not None:
                try:
                    job.voice = self.model.encode_voice(*job.reference)
                except ValueError as error:
                    job.sink(("error", 400, f"Could not encode the reference voice: {error}"))
                    self.metrics["errors_total"] += 1
                    continue
            if job.voice is None:  # a text-only answer: the thinker's text never depends on the voice
                job.voice = silent_voice(self.model)
            ready.append(job)
        return ready

    @torch.no_grad()
    def _join(self, jobs: List[GenerationJob]):
        """Prefill new requests (one batch), take their first frame, deliver it, and merge them into the running
        batch (after one more frame alone when they are off the running batch's text schedule)."""
        jobs = self._ready(jobs)
        if not jobs:
            return
        inputs = collate_thinker_inputs([job.thinker_inputs for job in jobs], self.processor.tokenizer.pad_token_id)
        forced = [job.forced_text_ids for job in jobs] if jobs[0].kind == "speech" else None
        inputs = self.model.prepare_generation_inputs(
            input_ids=None, attention_mask=None, input_values=None, input_values_cutoffs=None,
            voice=[job.voice for job in jobs], forced_text_ids=forced, **inputs,
        )
        generators = []
        for job in jobs:
            seed = job.seed if job.seed is not None else secrets.randbits(63)
            generators.append(torch.Generator(device=self.device).manual_seed(seed) if job.sampling.do_sample else None)
        newcomers = RunningBatch(jobs, None, generators, self._new_codec_states(jobs))
        self._refresh(newcomers)
        state, embeds, valid = newcomers.runner.start(inputs, max(job.max_frames for job in jobs),
                                                       reuse_voice_kv=True)
        newcomers.state = state
        self._step(newcomers, embeds, valid)
        self.metrics["batches_total"] += 1
        running = self._batch
        if running is not None and running.active == 0:
            running = None
        if running is not None and not all(newcomers.ended):
            per_text = self.model.config.audio_frames_per_text_token
            if state.frame_count % per_text != running.state.frame_count % per_text:
                self._step(newcomers)
        if all(newcomers.ended):  # e.g. answers that ended on their first frame
            return
        if running is None:
            with self._wake:
                self._batch = newcomers
            return
        self._merge(running, newcomers)
        self.metrics["joined_running_total"] += len(newcomers.jobs)
        logger.debug("%d request(s) joined a running batch of %d", len(newcomers.jobs), running.active)

    def _merge(self, running: RunningBatch, newcomers: RunningBatch):
        """newcomers' rows join `running`. With batched audio both sides first deliver what they hold, so that one
        decoder state can serve all rows from here on; with exact audio every row keeps its own pending output."""
        if not self.exact_audio:
            for batch in (running, newcomers):
                self._deliver_batch(batch)
        frames_left = max(job.max_frames - done for batch in (running, newcomers)
                          for job, done in zip(batch.jobs, batch.row_frames))
        running.state = merge_states([running.state, newcomers.state], max(frames_left, 1), self.model.config)
        if self.exact_audio:
            running.codec_states = running.codec_states + newcomers.codec_states
        elif running.codec_states or newcomers.codec_states:  # one decoder state over all rows
            parts = [batch.codec_states[0] if batch.codec_states else self.audio_decoder.init_state(len(batch.jobs))
                     for batch in (running, newcomers)]
            running.codec_states = [self.audio_decoder.concat_states(parts)]
        for name in RunningBatch.ROW_FIELDS:
            getattr(running, name).extend(getattr(newcomers, name))
        self._refresh(running)

    def _refresh(self, batch: RunningBatch):
        """Per-row sampling and limits for the batch's current rows."""
        batch.runner = RowSamplingGenerator(self.model, [job.sampling for job in batch.jobs], batch.generators)
        batch.limits = RowLimits(batch.jobs, self.device)

    def _new_codec_states(self, jobs: List[GenerationJob]) -> list:
        if self.exact_audio:
            return [self.audio_decoder.init_state(1) if job.want_audio else None for job in jobs]
        return [self.audio_decoder.init_state(len(jobs))] if any(job.want_audio for job in jobs) else []

    def _advance(self):
        """One frame of the running batch, its deliveries, and the removal of rows that ended."""
        batch = self._batch
        self._step(batch)
        if any(batch.ended):
            keep = [b for b, ended in enumerate(batch.ended) if not ended]
            with self._wake:
                if not keep:
                    self._batch = None
                    return
                self._drop_ended(batch, keep)

    def _step(self, batch: RunningBatch, embeds=None, valid=None):
        """One frame; its output joins each row's pending output, which is delivered at the row's chunk boundaries
        (exact audio: every `chunk_frames` frames of the row's own, as `model.stream(chunk_frames=...)` would) or at
        the batch's (batched audio)."""
        with torch.no_grad():
            batch.runner.step(batch.state, [batch.limits], embeds, valid)
            chunk = batch.runner.take_chunk(batch.state)
        valid_counts = chunk.audio_valid.sum(-1).tolist()
        finished = chunk.finished.tolist()
        for b in range(len(batch.jobs)):
            batch.row_frames[b] += 1
            batch.pending_codes[b].append(chunk.audio_codes[b])
            batch.pending_valid[b] += int(valid_counts[b])
            batch.pending_text[b].extend(chunk.text_ids[b].tolist())
            batch.finished[b] = batch.finished[b] or finished[b]
        size = self.chunk_frames[0]
        if self.exact_audio:
            for b, job in enumerate(batch.jobs):
                if not batch.ended[b] and (batch.row_frames[b] % size == 0 or batch.finished[b] or job.cancel.is_set()):
                    self._deliver_row(batch, b)
        else:
            batch.frames_since_emit += 1
            if batch.frames_since_emit >= size or any(
                    (f or job.cancel.is_set()) and not e for f, e, job in zip(batch.finished, batch.ended, batch.jobs)):
                self._deliver_batch(batch)

    def _drop_ended(self, batch: RunningBatch, keep: List[int]):
        batch.state = select_rows(batch.state, keep, self.model.config)
        for name in RunningBatch.ROW_FIELDS:
            setattr(batch, name, [getattr(batch, name)[b] for b in keep])
        if self.exact_audio:
            batch.codec_states = [batch.codec_states[b] for b in keep]
        elif batch.codec_states:
            batch.codec_states = [self.audio_decoder.select_state(batch.codec_states[0], keep)]
        self._refresh(batch)

    def _deliver_row(self, batch: RunningBatch, b: int):
        """Exact audio: decode row b's pending frames with its own decoder state and send them."""
        audio = None
        state = batch.codec_states[b]
        if state is not None and batch.pending_codes[b]:
            codes = torch.cat(batch.pending_codes[b]).T[None]  # [1, K, n]
            audio = self.audio_decoder.decode_chunk(codes, state)[0].float().cpu().numpy()
        self._send(batch, b, audio)

    def _deliver_batch(self, batch: RunningBatch):
        """Batched audio: decode every row's pending frames (the same count for all) in one call and send them."""
        batch.frames_since_emit = 0
        pcm = None
        if batch.codec_states and batch.pending_codes[0]:
            codes = torch.stack([torch.cat(pieces) for pieces in batch.pending_codes]).transpose(1, 2)  # [B, K, n]
            pcm = self.audio_decoder.decode_chunk(codes, batch.codec_states[0]).float().cpu().numpy()
        for b, job in enumerate(batch.jobs):
            self._send(batch, b, pcm[b] if pcm is not None and job.want_audio else None)

    def _send(self, batch: RunningBatch, b: int, audio):
        """Hand row b its pending text and audio (the row's own frames only); end it if it finished."""
        text_ids, valid = batch.pending_text[b], batch.pending_valid[b]
        batch.pending_codes[b], batch.pending_text[b], batch.pending_valid[b] = [], [], 0
        if batch.ended[b]:
            return
        job = batch.jobs[b]
        batch.text_counts[b] += len(text_ids)
        if text_ids:
            batch.last_text[b] = text_ids[-1]
        batch.frame_counts[b] += valid
        self.metrics["frames_total"] += valid
        if audio is not None:
            audio = audio[: valid * self.audio_decoder.frame_samples]
        if text_ids or (audio is not None and len(audio)):
            job.sink(("delta", text_ids, audio))
        if batch.finished[b] or job.cancel.is_set():
            self._end_rows(batch, [b])

    def _end_rows(self, batch: RunningBatch, rows):
        im_end = self.model.config.im_end_token_id
        for b in rows:
            if batch.ended[b]:
                continue
            batch.ended[b] = True
            job = batch.jobs[b]
            if job.cancel.is_set():
                reason = "cancelled"
                self.metrics["cancelled_total"] += 1
            elif batch.frame_counts[b] >= job.max_frames:
                reason = "length"
            elif not job.want_audio and batch.last_text[b] != im_end:
                reason = "length"  # the text limit ended a text-only answer
            else:
                reason = "stop"
            self.metrics["completed_total"] += reason != "cancelled"
            job.sink(("done", reason, batch.frame_counts[b], batch.text_counts[b]))

    def _shutdown(self):
        with self._wake:
            self._end_everything("The server is shutting down.")
        logger.info("worker stopped")

    def _end_everything(self, message: str):
        """Every running and queued request ends with a 503 error (lock held by caller)."""
        batch = self._batch
        if batch is not None:
            for b, job in enumerate(batch.jobs):
                if not batch.ended[b]:
                    batch.ended[b] = True
                    job.sink(("error", 503, message))
        self._batch = None
        while self._pending:
            item = self._pending.popleft()
            if isinstance(item, tuple):
                item[1].cancel()
            else:
                item.sink(("error", 503, message))


def prefill_groups(lengths: List[int], max_rows: int, max_tokens: int) -> List[List[int]]:
    """Indices of prompts (in order) grouped for prefill: a group's padded size (rows x longest prompt) stays within
    `max_tokens`, and it holds at most `max_rows`; a prompt longer than `max_tokens` is prefilled alone."""
    groups, current, longest = [], [], 0
    for i, length in enumerate(lengths):
        widest = max(longest, length)
        if current and (len(current) == max_rows or (len(current) + 1) * widest > max_tokens):
            groups.append(current)
            current, widest = [], length
        current.append(i)
        longest = widest
    if current:
        groups.append(current)
    return groups


def silent_voice(model) -> ChromaVoice:
    """A one-frame empty voice for text-only answers: the thinker's text never depends on the voice."""
    codes = torch.zeros(1, model.config.audio_num_codebooks, dtype=torch.long)
    return ChromaVoice(text_ids=torch.zeros(0, dtype=torch.long), codes=codes)


def collate_thinker_inputs(rows: List[Dict[str, torch.Tensor]], pad_id: int) -> Dict[str, Optional[torch.Tensor]]:
    """Per-request processor outputs (batch 1) -> one batch, padded as the processor pads a batch: prompt ids on the
    left, mel features on the right (padding is masked, so every row reads exactly its own inputs)."""
    length = max(r["thinker_input_ids"].shape[1] for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        n = r["thinker_input_ids"].shape[1]
        ids[b, length - n:] = r["thinker_input_ids"][0]
        mask[b, length - n:] = r["thinker_attention_mask"][0]
    clips = [(r["thinker_input_features"], r["thinker_feature_attention_mask"])
             for r in rows if r.get("thinker_input_features") is not None]
    features = feature_mask = None
    if clips:
        frames = max(f.shape[-1] for f, _ in clips)
        features = torch.cat([torch.nn.functional.pad(f, (0, frames - f.shape[-1])) for f, _ in clips])
        feature_mask = torch.cat([torch.nn.functional.pad(m, (0, frames - m.shape[-1])) for _, m in clips])
    return {"thinker_input_ids": ids, "thinker_attention_mask": mask,
            "thinker_input_features": features, "thinker_feature_attention_mask": feature_mask}


class EventBridge:
    """A job's sink for the worker's events: delivers them into an asyncio.Queue on the event loop (HTTP routes and
    realtime sessions both read their jobs' events this way)."""

    def __init__(self, loop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, event):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass
