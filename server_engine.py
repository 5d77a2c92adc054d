# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""The generation engine of the server: one worker thread owns the model.

Batching (`ChromaEngine`): requests wait in one FIFO queue. The worker admits every waiting request it has room for
as a *cohort*: one batched `ChromaGenerator.stream()` whose rows are the requests (the model gives each row of a
batch what it would give it alone). Requests that arrive while cohorts run form a new cohort at the next chunk
boundary, and the worker advances the active cohorts round-robin one chunk (`chunk_frames`) at a time, so a new
request starts within one chunk instead of waiting for the running batch to end. Rows of one cohort share every
decode step; different cohorts do not (joining a running batch would need the generator to merge per-row state).

Per-row behaviour inside a cohort, so that a request's output never depends on its neighbours:
    * sampling: every row has its own `SamplingParams` and its own `torch.Generator` (`RowSamplingGenerator`), seeded
      with the request's `seed` (or a random one); its draws are exactly those of `model.generate(seed=...)` alone;
    * limits: audio frames, text tokens, text-only answers and cancellation end single rows (`RowLimits`);
    * a client that disconnects sets its row's cancel flag: the row ends after the current frame, and a cohort
      whose rows all ended stops, freeing its slots;
    * audio: the engine decodes the codes with the streaming Mimi decoder, batched (a row's samples may differ
      from its solo run by float rounding, at most 1 LSB of 16-bit PCM) or, with `exact_audio`, row by row
      (bit-identical to the solo run). Codes and text are identical either way.

Not a hub file (needs the `server` extra).
"""

import collections
import logging
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional

import torch

from .generation_chroma import ChromaGenerator, ChromaVoice, SamplingParams, sample_next_token
from .server_schemas import APIError


logger = logging.getLogger("openchroma.server")


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
    every row). Here a sampled row runs `sample_next_token` on its own logits [1, V] with its own generator, which
    is exactly what `model.generate(seed=...)` does for that request alone; greedy rows take the argmax together.
    """

    def __init__(self, model, row_sampling: List[SamplingParams], row_generators: List[Optional[torch.Generator]]):
        super().__init__(model)
        self.sampled_rows = [(b, p, g) for b, (p, g) in enumerate(zip(row_sampling, row_generators)) if p.do_sample]

    def choose_code(self, logits, params):
        logits = logits[..., : self.config.codebook_size]  # never a special value: Mimi decodes every frame
        codes = logits.argmax(dim=-1)
        for b, row_params, generator in self.sampled_rows:
            codes[b] = sample_next_token(logits[b:b + 1], row_params, generator)[0]
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
        stop = (len(state.frames) >= self.max_frames) | (self.text_only & ~state.thinker_alive)
        if any(job.cancel.is_set() for job in self.jobs):
            stop = stop | torch.tensor([job.cancel.is_set() for job in self.jobs], device=stop.device)
        return stop


@dataclass
class Cohort:
    """Requests admitted together: one batched stream, advanced one chunk at a time."""

    jobs: List[GenerationJob]
    chunks: Any  # the ChromaGenerator.stream iterator (codes and text; audio is decoded by the engine)
    codec_states: list  # one MimiStreamState for the whole batch, or one per row (exact_audio)
    # per row: the answer is complete; text ids and audio frames sent so far; the last text id
    ended: List[bool] = field(init=False)
    text_counts: List[int] = field(init=False)
    frame_counts: List[int] = field(init=False)
    last_text: List[Optional[int]] = field(init=False)

    def __post_init__(self):
        n = len(self.jobs)
        self.ended, self.text_counts, self.frame_counts, self.last_text = [False] * n, [0] * n, [0] * n, [None] * n


class ChromaEngine:
    """Owns the model on one worker thread; see the module docstring for the scheduling.

    max_batch_size: rows per cohort; max_active_rows: rows across all running cohorts (the rest wait, FIFO);
    batch_window_s: when idle, how long the first request waits for others to share its cohort;
    chunk_frames: frames per chunk (the granularity of streaming and of round-robin between cohorts);
    exact_audio: decode every row's audio on its own (a batch-of-one Mimi call per row and chunk), so a request's
        audio is bit-identical alone or under load. Batched decoding (the default) is faster; its rows differ from
        solo decoding by float re-association (|error| ~1e-6, at most 1 LSB of 16-bit PCM). The codes and text
        are identical either way.
    """

    def __init__(self, model, processor, max_batch_size: int = 16, max_active_rows: int = 64,
                 batch_window_s: float = 0.01, chunk_frames=(2,), exact_audio: bool = False):
        self.model = model
        self.processor = processor
        self.audio_decoder = model.streaming_audio_decoder()
        self.exact_audio = exact_audio
        self.device = model.backbone.codebook0_head.weight.device
        self.max_batch_size = max_batch_size
        self.max_active_rows = max_active_rows
        self.batch_window_s = batch_window_s
        self.chunk_frames = tuple(chunk_frames)
        self.metrics = collections.Counter()
        self._pending = collections.deque()  # GenerationJob | (callable, Future), FIFO
        self._cohorts = []  # running Cohorts, advanced in turn
        self._turn = 0
        self._wake = threading.Condition()
        self._stopping = False
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

    def submit(self, job: GenerationJob):
        with self._wake:
            if self._stopping:
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
            active = sum(len(c.jobs) - sum(c.ended) for c in self._cohorts)
            return {"queued": queued, "active_rows": active, "cohorts": len(self._cohorts),
                    "worker_alive": self.alive, **self.metrics}

    # -- worker thread -----------------------------------------------------------------------------------------------

    def _run(self):
        logger.info("worker started (max batch %d, %d active rows)", self.max_batch_size, self.max_active_rows)
        while True:
            with self._wake:
                while not self._pending and not self._cohorts and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
                if not self._cohorts and self._pending and self.batch_window_s > 0:
                    self._wait_for_company()
                admitted = self._take_admissible()
            for item in admitted:
                if isinstance(item, tuple):
                    self._run_call(*item)
            jobs = [item for item in admitted if isinstance(item, GenerationJob)]
            for kind in ("chat", "speech"):  # a batch is all free-talking or all forced-text (speech) rows
                group = [job for job in jobs if job.kind == kind]
                for start in range(0, len(group), self.max_batch_size):
                    rows = group[start:start + self.max_batch_size]
                    try:
                        self._start_cohort(rows)
                    except Exception as error:
                        self._fail(rows, error)
            if self._cohorts:  # round-robin: one chunk of the next cohort
                self._turn %= len(self._cohorts)
                cohort = self._cohorts[self._turn]
                try:
                    keep = self._advance(cohort)
                except Exception as error:
                    self._fail([job for job, ended in zip(cohort.jobs, cohort.ended) if not ended], error)
                    keep = False
                if keep:
                    self._turn += 1
                else:
                    with self._wake:
                        self._cohorts.remove(cohort)
        self._shutdown()

    def _fail(self, jobs, error):
        """An unexpected failure: the requests involved get a 500, the worker carries on."""
        logger.error("generation failed for %d request(s)", len(jobs), exc_info=error)
        for job in jobs:
            job.sink(("error", 500, f"Generation failed: {error}"))
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
        active = sum(len(c.jobs) - sum(c.ended) for c in self._cohorts)
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

    def _start_cohort(self, jobs: List[GenerationJob]):
        ready = []
        for job in jobs:
            if job.cancel.is_set():  # the client left while queued
                self.metrics["cancelled_total"] += 1
                continue
            if job.voice is None and job.reference is not None:
                try:
                    job.voice = self.model.encode_voice(*job.reference)
                except Exception as error:
                    job.sink(("error", 400, f"Could not encode the reference voice: {error}"))
                    self.metrics["errors_total"] += 1
                    continue
            if job.voice is None:  # a text-only answer: the thinker's text never depends on the voice
                job.voice = silent_voice(self.model)
            ready.append(job)
        if not ready:
            return
        chunks = self._stream(ready)
        wants_audio = [job.want_audio for job in ready]
        if self.exact_audio:
            states = [self.audio_decoder.init_state(1) if want else None for want in wants_audio]
        else:
            states = [self.audio_decoder.init_state(len(ready))] if any(wants_audio) else []
        with self._wake:
            self._cohorts.append(Cohort(ready, chunks, states))
        self.metrics["batches_total"] += 1
        logger.debug("started a %s batch of %d", ready[0].kind, len(ready))

    def _stream(self, jobs: List[GenerationJob]):
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
        runner = RowSamplingGenerator(self.model, [job.sampling for job in jobs], generators)
        return runner.stream(
            inputs, max(job.max_frames for job in jobs), chunk_frames=self.chunk_frames,
            decode_audio=False, stopping_criteria=[RowLimits(jobs, self.device)],
            reuse_voice_kv=True,
        )

    def _advance(self, cohort: Cohort) -> bool:
        """Run the cohort to its next chunk and hand every row its part. -> False when the cohort is over."""
        try:
            with torch.no_grad():
                chunk = next(cohort.chunks)
        except StopIteration:
            self._end_rows(cohort, range(len(cohort.jobs)))
            return False
        pcm = self._decode(cohort, chunk)
        valid_counts = chunk.audio_valid.sum(-1).tolist()
        finished = chunk.finished.tolist()
        samples_per_frame = self.audio_decoder.frame_samples
        for b, job in enumerate(cohort.jobs):
            if cohort.ended[b]:
                continue
            text_ids = chunk.text_ids[b].tolist()
            cohort.text_counts[b] += len(text_ids)
            if text_ids:
                cohort.last_text[b] = text_ids[-1]
            valid = int(valid_counts[b])
            cohort.frame_counts[b] += valid
            self.metrics["frames_total"] += valid
            audio = pcm[b][: valid * samples_per_frame] if pcm[b] is not None else None
            if text_ids or (audio is not None and len(audio)):
                job.sink(("delta", text_ids, audio))
            if finished[b] or job.cancel.is_set():
                self._end_rows(cohort, [b])
        return not all(cohort.ended)

    def _decode(self, cohort: Cohort, chunk) -> list:
        """The chunk's codes -> per row a float32 waveform [n * frame_samples] (None for rows without audio).
        Rows past their end decode zeros, which keeps a batched decoder state aligned; their audio is dropped."""
        codes = chunk.audio_codes.transpose(1, 2)  # [B, K, n]
        rows = [None] * len(cohort.jobs)
        if not cohort.codec_states:
            return rows
        if not self.exact_audio:
            pcm = self.audio_decoder.decode_chunk(codes, cohort.codec_states[0]).float().cpu().numpy()
            return [pcm[b] if job.want_audio else None for b, job in enumerate(cohort.jobs)]
        for b, state in enumerate(cohort.codec_states):
            if state is not None and not cohort.ended[b]:
                rows[b] = self.audio_decoder.decode_chunk(codes[b:b + 1], state)[0].float().cpu().numpy()
        return rows

    def _end_rows(self, cohort: Cohort, rows):
        im_end = self.model.config.im_end_token_id
        for b in rows:
            if cohort.ended[b]:
                continue
            cohort.ended[b] = True
            job = cohort.jobs[b]
            if job.cancel.is_set():
                reason = "cancelled"
                self.metrics["cancelled_total"] += 1
            elif cohort.frame_counts[b] >= job.max_frames:
                reason = "length"
            elif not job.want_audio and cohort.last_text[b] != im_end:
                reason = "length"  # the text limit ended a text-only answer
            else:
                reason = "stop"
            self.metrics["completed_total"] += reason != "cancelled"
            job.sink(("done", reason, cohort.frame_counts[b], cohort.text_counts[b]))

    def _shutdown(self):
        for cohort in self._cohorts:
            for b, job in enumerate(cohort.jobs):
                if not cohort.ended[b]:
                    job.sink(("error", 503, "The server is shutting down."))
        self._cohorts.clear()
        while self._pending:
            item = self._pending.popleft()
            if isinstance(item, tuple):
                item[1].cancel()
            else:
                item.sink(("error", 503, "The server is shutting down."))
        logger.info("worker stopped")


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


