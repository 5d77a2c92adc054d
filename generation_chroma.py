# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Generation for Chroma: our own loop with explicit per-request state (no transformers `generate()` inside).

One answer, step by step (backbone step s = 0, 1, 2, ...; one audio frame per step)::

    s = 0   prefill: thinker reads the conversation -> (h, t1); Mimi encodes the reference voice;
            backbone input = [E(text_start), E(transcript), E(text_end), frames(ref), 0, h, E(t1)]
    s >= 1  backbone input = [frame_emb(frame s-1)]
            + [h_j, E(t_j+1)] when s % audio_frames_per_text_token == 0 and the row's thinker is still talking
              (the thinker runs one step on t_j; it stops for good after emitting <|im_end|>, whose pair is still fed)
    every step: codebook 0 from the backbone, codebooks 1..K-1 from the depth decoder (fixed K-1 step loop)
    stop a row after a frame whose codebooks 0..K-2 all equal codebook_eos_token_id (that frame is kept unless all
    K codes are 0), or after max_new_tokens frames.

Batches: every row behaves exactly as if it ran alone. Rows are left-padded inside each step's input; padding slots
are masked out of attention for good and do not advance the row's RoPE position (the official batch mode counts
them, so its rows drift from their solo runs).

Shapes: B batch, K codebooks, V audio vocabulary, D backbone width, S thinker tokens.
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import logging

from .batching_chroma import merge_states, select_rows
from .cache_chroma import (
    ChromaKVCache,
    backbone_slots_needed,
    left_pad,
    padding_causal_mask,
    text_step_due,
    thinker_steps_needed,
)
from .sampling_chroma import SamplingParams, sample_next_token
from .state_chroma import ChromaChunk, ChromaGenerateOutput, ChromaGenerationState, collect_output
from .voice_chroma import ChromaVoice


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------------------------------


class ChromaGenerator:
    """Runs the Chroma loop on a `ChromaForConditionalGeneration`. Holds settings only: per-request state lives in
    `ChromaGenerationState`, so one generator can serve many requests.

    audio_sampling: codebook 0; depth_sampling: codebooks 1..K-1 (defaults to audio_sampling, as published);
    text_sampling: the thinker (greedy by default, as published); generator: the torch.Generator all draws use.
    """

    def __init__(self, model, audio_sampling: SamplingParams = SamplingParams(),
                 depth_sampling: Optional[SamplingParams] = None, text_sampling: SamplingParams = SamplingParams(),
                 generator: Optional[torch.Generator] = None, static_thinker: bool = True, compile: bool = False):
        self.model = model
        self.config = model.config
        self.audio_sampling = audio_sampling
        self.depth_sampling = depth_sampling if depth_sampling is not None else audio_sampling
        self.text_sampling = text_sampling
        self.generator = generator
        # text steps on a preallocated cache (fast path) or through the transformers thinker forward (reference)
        self.thinker_decoder = model.thinker_decoder() if static_thinker else None
        # opt-in: the one-frame step through torch.compile (CUDA graphs on a GPU); the eager loop is the reference
        self.compiled_frame_step = None
        if compile:
            device = model.backbone_device_dtype()[0]
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            self.compiled_frame_step = torch.compile(self.frame_step, mode=mode, dynamic=False)

    # -- prefill -------------------------------------------------------------------------------------------------------

    def thinker_prefill(self, input_ids, attention_mask, input_features=None, feature_attention_mask=None):
        """Run the thinker on the whole prompt. -> (cache, hidden [B, D], first id [B], next position [B]).

        The answer starts at each row's last real position (prompts may be left- or right-padded), and the lm_head
        runs on that position only (at full size, all positions would cost 152k logits per prompt token)."""
        thinker = self.model.thinker
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Audio/text prompts use plain sequential positions on all three M-RoPE sections (Qwen2.5-Omni's rule for
        # non-visual tokens); computing them here keeps padding rows correct and leaves no state on the module.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        embeds = thinker.get_input_embeddings()(input_ids)  # [B, S, D]
        if input_features is not None:  # Whisper features -> audio tower -> the <|AUDIO|> placeholder slots
            audio = thinker.get_audio_features(input_features.to(thinker.dtype),
                                               feature_attention_mask=feature_attention_mask,
                                               return_dict=True).last_hidden_state  # [audio tokens, D]
            slots = input_ids == thinker.config.audio_token_id  # [B, S]
            if int(slots.sum()) != audio.shape[0]:
                raise ValueError(f"the thinker prompt has {int(slots.sum())} audio placeholder tokens but its audio "
                                 f"features give {audio.shape[0]}: pass what ChromaProcessor returns")
            embeds = embeds.masked_scatter(slots[..., None], audio.to(embeds.dtype))
        text_model = (self.thinker_decoder or self.model.thinker_decoder()).text_model
        out = text_model(inputs_embeds=embeds, attention_mask=attention_mask,
                         position_ids=positions[None].expand(3, -1, -1), use_cache=True)
        last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)  # [B] last real position
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        hidden = out.last_hidden_state[rows, last]  # post final norm: the lm_head input
        first_id = sample_next_token(thinker.lm_head(hidden), self.text_sampling, self.generator)
        return out.past_key_values, hidden, first_id, positions[rows, last] + 1

    def voices_from_inputs(self, input_ids, attention_mask, input_values, cutoffs=None):
        """Processor-style reference inputs -> one `ChromaVoice` per row.

        Each clip is encoded at its own length, as a solo request would be: Mimi's last (partial) frame depends on
        what follows the clip, so encoding right-padded rows together would change it. Rows of equal length share
        one encoder call."""
        batch = input_values.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = [int(c) for c in cutoffs] if cutoffs is not None else [input_values.shape[-1]] * batch
        codes = [None] * batch
        for length in sorted(set(lengths)):
            rows = [b for b in range(batch) if lengths[b] == length]
            group = self.model.encode_audio(input_values[rows, :, :length])  # [len(rows), F, K]
            for i, b in enumerate(rows):
                codes[b] = group[i]
        return [ChromaVoice(text_ids=input_ids[b][attention_mask[b].bool()], codes=codes[b]) for b in range(batch)]

    def start(self, inputs, max_new_tokens, reuse_voice_kv=False):
        """Prefill everything. -> (state, first backbone input [B, L, D], its validity [B, L]).

        The backbone prompt of row b is [voice prefix, h, E(t1)], left-padded. With reuse_voice_kv the voice
        prefixes' keys/values come from the voices' caches and only the last two positions are run here."""
        model, config = self.model, self.config
        cache, hidden, first_id, next_pos = self.thinker_prefill(
            inputs["thinker_input_ids"], inputs.get("thinker_attention_mask"),
            inputs.get("thinker_input_features"), inputs.get("thinker_feature_attention_mask"),
        )
        voices = inputs.get("voices") or self.voices_from_inputs(
            inputs["input_ids"], inputs.get("attention_mask"), inputs["input_values"], inputs.get("input_values_cutoffs")
        )
        forced = inputs.get("forced_text_ids")
        if forced is not None:  # speak a given text: the thinker reads it instead of choosing its own words
            forced = torch.cat([forced, forced.new_full((forced.shape[0], 1), -1)], dim=1)
            forced = torch.where(forced < 0, torch.full_like(forced, config.im_end_token_id), forced)
            first_id = forced[:, 0]
        answer_start = torch.stack([hidden, model.embed_text(first_id)], dim=1)  # [B, 2, D]
        prompt, valid = left_pad([torch.cat([v.prefix_embeddings(model), answer_start[b]]) for b, v in enumerate(voices)])
        batch, length, device, dtype = prompt.shape[0], prompt.shape[1], prompt.device, prompt.dtype
        per_text = config.audio_frames_per_text_token
        capacity = length + backbone_slots_needed(max_new_tokens, per_text)
        if self.compiled_frame_step is not None:  # fixed shapes across requests: no recompilation per request length
            capacity = -(-capacity // CACHE_BUCKET) * CACHE_BUCKET
        thinker_mask = inputs.get("thinker_attention_mask")
        if thinker_mask is None:
            thinker_mask = torch.ones_like(inputs["thinker_input_ids"])
        state = ChromaGenerationState(
            cache=ChromaKVCache(config.backbone_config, batch, capacity, device, dtype),
            slot_valid=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
            next_slot=0,
            next_position=torch.zeros(batch, dtype=torch.long, device=device),
            depth_cache=ChromaKVCache(config.decoder_config, batch, config.audio_num_codebooks, device, dtype),
            thinker_cache=cache,
            thinker_mask=thinker_mask,
            thinker_next_position=next_pos,
            thinker_alive=first_id != config.im_end_token_id,
            last_text_id=first_id,
            text_count=torch.ones(batch, dtype=torch.long, device=device),
            forced_text=forced,
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            row_frames=torch.zeros(batch, dtype=torch.long, device=device),
        )
        if self.thinker_decoder is not None:
            text_steps = thinker_steps_needed(max_new_tokens, per_text)
            state.thinker_cache = self.thinker_decoder.init_cache(cache, thinker_mask, thinker_mask.shape[1] + text_steps)
        state.text_ids.append(first_id)
        state.text_valid.append(torch.ones(batch, dtype=torch.bool, device=device))
        state.thinker_may_talk = bool(state.thinker_alive.any())
        if self.compiled_frame_step is not None:  # CUDA graphs may keep the caches at fixed addresses
            for buffer in state.cache.keys + state.cache.values + state.depth_cache.keys + state.depth_cache.values:
                torch._dynamo.mark_static_address(buffer)
        if not reuse_voice_kv:
            return state, prompt, valid
        prefix = length - 2
        for b, voice in enumerate(voices):
            kv = voice.prefix_kv(model)
            for layer, (k, v) in enumerate(kv):
                state.cache.keys[layer][b, :, prefix - k.shape[1]:prefix] = k
                state.cache.values[layer][b, :, prefix - k.shape[1]:prefix] = v
        state.slot_valid[:, :prefix] = valid[:, :prefix]
        state.next_slot = prefix
        state.next_position = valid[:, :prefix].long().sum(-1)
        return state, prompt[:, prefix:], valid[:, prefix:]

    # -- one text step, one audio frame ------------------------------------------------------------------------------

    def text_step(self, state):
        """One thinker step on the last id. -> the pair [h_j, E(t_j+1)] [B, 2, D] and its validity [B] (rows whose
        thinker was still talking)."""
        thinker, config = self.model.thinker, self.config
        alive = state.thinker_alive
        pad_id = config.thinker_config.pad_token_id or 0
        ids = torch.where(alive, state.last_text_id, torch.full_like(state.last_text_id, pad_id))
        if self.thinker_decoder is not None:
            hidden, logits = self.thinker_decoder.step(state.thinker_cache, ids, state.thinker_next_position, alive)
        else:
            state.thinker_mask = torch.cat([state.thinker_mask, alive[:, None].to(state.thinker_mask.dtype)], dim=1)
            out = thinker(
                input_ids=ids[:, None],
                attention_mask=state.thinker_mask,
                position_ids=state.thinker_next_position[None, :, None].expand(3, -1, 1),
                past_key_values=state.thinker_cache,
                use_cache=True,
                output_hidden_states=True,
            )
            state.thinker_cache = out.past_key_values
            hidden, logits = out.hidden_states[-1][:, -1], out.logits[:, -1]
        if state.forced_text is None or state.forced_rows is not None:
            next_id = sample_next_token(logits, self.text_sampling, self.generator)
        if state.forced_text is not None:
            index = state.text_count.clamp(max=state.forced_text.shape[1] - 1)
            forced_id = state.forced_text.gather(1, index[:, None])[:, 0]
            next_id = forced_id if state.forced_rows is None else torch.where(state.forced_rows, forced_id, next_id)
        state.thinker_next_position = state.thinker_next_position + alive.long()
        state.text_ids.append(next_id)
        state.text_valid.append(alive.clone())
        state.text_count = state.text_count + alive.long()
        state.last_text_id = torch.where(alive, next_id, state.last_text_id)
        state.thinker_alive = alive & (next_id != config.im_end_token_id)
        pair = torch.stack([hidden, self.model.embed_text(next_id)], dim=1)
        return pair, alive

    def backbone_step(self, state, embeds, valid):
        """Append embeds [B, L, D] (valid [B, L]) to the backbone. -> post-norm hidden [B, D] and codebook-0 logits
        [B, V] at the last slot."""
        step_inputs = self.backbone_step_inputs(state, valid, static=False)
        hidden, logits = self.model.backbone(embeds, *step_inputs, logits_to_keep=1)
        return hidden[:, -1], logits[:, -1]

    def backbone_step_inputs(self, state, valid, static):
        """Book-keeping of one backbone step: -> (positions [B, L], attention mask, cache, cache slot(s)).

        Eager path: attention over the filled prefix of the cache. Static path (compiled step): over the whole
        cache with a [B, 1, L, capacity] mask, slots given as a tensor, so every step has the same shapes."""
        length = valid.shape[1]
        start = state.next_slot
        state.slot_valid[:, start:start + length] = valid
        positions = (state.next_position[:, None] + valid.long().cumsum(-1) - 1).clamp(min=0)
        state.next_position = state.next_position + valid.long().sum(-1)
        state.next_slot = start + length
        if not static:
            return positions, padding_causal_mask(state.slot_valid[:, : state.next_slot], length), state.cache, start
        slots = torch.arange(start, start + length, device=valid.device)
        keys = torch.arange(state.slot_valid.shape[1], device=valid.device)
        mask = (keys[None, :] <= slots[:, None])[None] & state.slot_valid[:, None, :]
        mask = mask | (keys[None, :] == slots[:, None])[None]
        return positions, mask[:, None], state.cache, slots

    def depth_step(self, state, backbone_hidden, c0):
        """Codebooks 1..K-1 for one frame. -> frame [B, K] and raw logits [B, K-1, V].

        Positions reproduce the official inference: the backbone state and A(c0) are both at position 0, then
        A(c_k) at position k (the 8 inputs sit at [0, 0, 1, ..., K-2])."""
        decoder, config = self.model.decoder, self.config
        cos, sin = self.depth_rope(backbone_hidden)  # [1, K, hd] for positions [0, 0, 1, ..., K-2]
        inputs = torch.stack([backbone_hidden, decoder.audio_embedding(c0, 0)], dim=1)  # [B, 2, D]
        codes, all_logits = [c0], []
        hidden = decoder(inputs, None, None, state.depth_cache, 0, rope=(cos[:, :2], sin[:, :2]))[:, -1]
        for k in range(1, config.audio_num_codebooks):
            if k > 1:
                step_input = decoder.audio_embedding(codes[-1], k - 1)[:, None]
                rope = (cos[:, k:k + 1], sin[:, k:k + 1])
                hidden = decoder(step_input, None, None, state.depth_cache, k, rope=rope)[:, -1]
            logits = decoder.codebook_logits(hidden, k)
            all_logits.append(logits)
            codes.append(self.choose_code(logits, self.depth_sampling))
        return torch.stack(codes, dim=-1), torch.stack(all_logits, dim=1)

    def depth_rope(self, like):
        """(cos, sin) [1, K, head_dim] of the depth decoder's inference positions [0, 0, 1, ..., K-2], computed once
        per device and dtype (they are the same every frame)."""
        key = (like.device, like.dtype)
        if getattr(self, "_depth_rope_key", None) != key:
            k = self.config.audio_num_codebooks
            positions = torch.cat([torch.zeros(1), torch.arange(k - 1)]).long().to(like.device)[None]
            self._depth_rope = self.model.decoder.model.rotary_emb(positions, like.dtype)
            self._depth_rope_key = key
        return self._depth_rope

    def choose_code(self, logits, params):
        """Sample a Mimi code: values >= codebook_size (2048..2050) are never chosen, so Mimi can decode every frame."""
        return sample_next_token(logits[..., : self.config.codebook_size], params, self.generator)

    def audio_step(self, state, embeds, valid):
        """One backbone step plus the depth loop. -> frame [B, K].

        The prompt step always runs eagerly; later steps (1 or 3 new positions) use the compiled one-frame step when
        the generator was built with compile=True."""
        if self.compiled_frame_step is None or embeds.shape[1] > 3:
            hidden, c0_logits = self.backbone_step(state, embeds, valid)
            c0 = self.choose_code(c0_logits, self.audio_sampling)
            frame, depth_logits = self.depth_step(state, hidden, c0)
        else:
            positions, mask, cache, slots = self.backbone_step_inputs(state, valid, static=True)
            frame, c0_logits, depth_logits = self.compiled_frame_step(state, embeds, positions, mask, slots)
        state.c0_logits.append(c0_logits)
        state.depth_logits.append(depth_logits)
        return frame

    def frame_step(self, state, embeds, positions, mask, slots):
        """The one-frame step with fixed shapes (what compile=True compiles): backbone over the whole cache, codebook
        0, depth loop. -> frame [B, K], codebook-0 logits [B, V], depth logits [B, K-1, V]."""
        hidden, logits = self.model.backbone(embeds, positions, mask, state.cache, slots, logits_to_keep=1)
        c0_logits = logits[:, -1]
        c0 = self.choose_code(c0_logits, self.audio_sampling)
        frame, depth_logits = self.depth_step(state, hidden[:, -1], c0)
        return frame, c0_logits, depth_logits

    def record_frame(self, state, frame):
        """Keep the frame for unfinished rows; finish rows whose frame is the EOS frame (kept unless all K codes are
        the EOS value)."""
        config = self.config
        eos = (frame[:, : config.audio_num_codebooks - 1] == config.codebook_eos_token_id).all(-1)
        keep = ~state.finished & ~(eos & (frame == config.codebook_eos_token_id).all(-1))
        state.frames.append(frame)
        state.frame_valid.append(keep)
        state.frame_count += 1
        state.row_frames = state.row_frames + 1
        state.last_frame = frame
        state.finished = state.finished | eos

    def next_input(self, state, frame):
        """The next backbone input: the frame's embedding, plus a thinker pair when the schedule says so."""
        frame_embed = self.model.embed_frames(frame)[:, None]  # [B, 1, D]
        frame_valid = torch.ones(frame.shape[0], 1, dtype=torch.bool, device=frame.device)
        due = text_step_due(state.frame_count, self.config.audio_frames_per_text_token)
        # thinker_may_talk is refreshed at sync points; a stale True costs one masked thinker step, never a result
        if not (due and state.thinker_may_talk):
            return frame_embed, frame_valid
        pair, has_pair = self.text_step(state)
        # rows with a pair: [frame, h, E(t)]; rows without: [pad, pad, frame] (left padding keeps the last slot real)
        with_pair = torch.cat([frame_embed, pair], dim=1)
        without = torch.cat([torch.zeros_like(pair), frame_embed], dim=1)
        embeds = torch.where(has_pair[:, None, None], with_pair, without)
        valid = torch.ones(frame.shape[0], 3, dtype=torch.bool, device=frame.device)
        valid[:, :2] = has_pair[:, None]
        return embeds, valid

    # -- the loop --------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def stream(self, inputs, max_new_tokens, max_text_tokens=None, chunk_frames=(2, 4, 8), decode_audio=True,
               stopping_criteria=(), cancel=None, reuse_voice_kv=False, sync_every=None):
        """Yield `ChromaChunk`s while generating; returns the final `ChromaGenerationState` (StopIteration.value).

        chunk_frames: frames per chunk, one entry per chunk, the last repeated (default: 2, then 4, then 8).
        stopping_criteria: callables `f(state) -> bool or BoolTensor [B]`; True finishes the row(s).
        cancel: an object with `is_set()` (e.g. threading.Event); when set, generation ends after the current frame.
        Closing the iterator also stops generation at once.
        sync_every: frames between checks of the end of every row (a device sync); chunk boundaries always check.
        Frames generated after a row's end are never part of its output, so this changes speed, not results.
        """
        if isinstance(chunk_frames, int):
            chunk_frames = (chunk_frames,)
        if not chunk_frames or any(int(n) < 1 for n in chunk_frames):
            raise ValueError(f"chunk_frames must be positive frame counts, got {chunk_frames!r}")
        state, embeds, valid = self.start(inputs, max_new_tokens, reuse_voice_kv=reuse_voice_kv)
        audio_decoder = codec_state = None
        if decode_audio:
            audio_decoder = self.model.streaming_audio_decoder()
            codec_state = audio_decoder.init_state(embeds.shape[0])
        if sync_every is None:  # the CPU has nothing to overlap; on an accelerator, host syncs stall the queue
            sync_every = 1 if embeds.device.type == "cpu" else 4
        emitted_frames = emitted_text = chunk_index = 0
        while True:
            self.step(state, stopping_criteria, embeds, valid, max_text_tokens)
            embeds = valid = None  # from now on the step builds its input from the last frame
            if cancel is not None and cancel.is_set():
                state.cancelled = True
            size = int(chunk_frames[min(chunk_index, len(chunk_frames) - 1)])
            boundary = len(state.frames) - emitted_frames >= size
            done = state.cancelled or len(state.frames) == max_new_tokens
            if not done and (boundary or len(state.frames) % sync_every == 0):
                # the only device->host syncs: whether every row ended, and whether any thinker still talks
                done = bool(state.finished.all())
                state.thinker_may_talk = bool(state.thinker_alive.any())
            if done or boundary:
                yield self.make_chunk(state, emitted_frames, emitted_text, audio_decoder, codec_state)
                emitted_frames, emitted_text, chunk_index = len(state.frames), len(state.text_ids), chunk_index + 1
            if done:
                return state

    def apply_stops(self, state, max_text_tokens, stopping_criteria):
        """Text limit (the thinker stops talking) and user criteria (the row's answer ends)."""
        if max_text_tokens is not None:
            state.thinker_alive = state.thinker_alive & (state.text_count < max_text_tokens)
        for criterion in stopping_criteria:
            verdict = criterion(state)
            if isinstance(verdict, torch.Tensor):
                state.finished = state.finished | verdict.to(state.finished.device).bool()
            elif verdict:
                state.finished = torch.ones_like(state.finished)

    def make_chunk(self, state, frame_start, text_start, audio_decoder, codec_state) -> ChromaChunk:
        if frame_start >= len(state.frames):  # nothing new (e.g. right after a merge)
            batch, k = state.finished.shape[0], self.config.audio_num_codebooks
            frames = state.finished.new_zeros(batch, 0, k, dtype=torch.long)
            keep = state.finished.new_zeros(batch, 0)
        else:
            frames = torch.stack(state.frames[frame_start:], dim=1)  # [B, n, K]
            keep = torch.stack(state.frame_valid[frame_start:], dim=1)  # [B, n]
        codes = torch.where(keep[..., None], frames, torch.zeros_like(frames))
        texts = [[] for _ in range(frames.shape[0])]
        for ids, ok in zip(state.text_ids[text_start:], state.text_valid[text_start:]):
            for b in ok.nonzero().flatten().tolist():
                texts[b].append(ids[b])
        pcm = None
        if audio_decoder is not None:
            pcm = audio_decoder.decode_chunk(codes.transpose(1, 2), codec_state)
        return ChromaChunk(
            text_ids=[torch.stack(t) if t else frames.new_zeros(0) for t in texts],
            audio_codes=codes, audio_valid=keep, pcm=pcm, finished=state.finished.clone(), frame_offset=frame_start,
        )

    def take_chunk(self, state) -> ChromaChunk:
        """Everything `state` produced since the last take, as a chunk without audio; empties its output lists
        (frames, text ids, logits). For callers that drive the steps themselves (`step`, `merge_states`)."""
        chunk = self.make_chunk(state, 0, 0, None, None)
        for outputs in (state.frames, state.frame_valid, state.text_ids, state.text_valid, state.c0_logits,
                        state.depth_logits):
            outputs.clear()
        return chunk

    def step(self, state, stopping_criteria=(), embeds=None, valid=None, max_text_tokens=None):
        """One frame for every row: the next backbone input (or `embeds` [B, L, D] / `valid` [B, L], the prompt
        from `start`), the audio step, the frame's bookkeeping and the stops. -> frame [B, K]."""
        if embeds is None:
            embeds, valid = self.next_input(state, state.last_frame)
        frame = self.audio_step(state, embeds, valid)
        self.record_frame(state, frame)
        self.apply_stops(state, max_text_tokens, stopping_criteria)
        return frame

    def generate(self, inputs, max_new_tokens, **stream_kwargs):
        """Run `stream()` to the end (no audio decode); -> the final state."""
        stream_kwargs.setdefault("decode_audio", False)
        stream_kwargs.setdefault("chunk_frames", (max_new_tokens,))
        chunks = self.stream(inputs, max_new_tokens, **stream_kwargs)
        while True:
            try:
                next(chunks)
            except StopIteration as stop:
                return stop.value

    def finalize(self, state) -> ChromaGenerateOutput:
        return collect_output(state, self.config)


# ----------------------------------------------------------------------------------------------------------------------
# The model-facing entry points
# ----------------------------------------------------------------------------------------------------------------------

# Cache capacities of the compiled path are rounded up to a multiple of this many slots.
CACHE_BUCKET = 512

# Defaults = the published generation settings (transformers 5.0.0rc0 GenerationConfig defaults, max 1000 frames).
DEFAULT_MAX_NEW_TOKENS = 1000
PUBLISHED_AUDIO_SAMPLING = SamplingParams(do_sample=False, temperature=1.0, top_k=50, top_p=1.0)

@dataclass
class ChromaGenerationOptions:
    """How to generate: every `generate()` / `stream()` argument besides the inputs, as one object. `None` means
    "the model's generation_config, else the published default" (`resolve`)."""

    max_new_tokens: Optional[int] = None  # audio frames (80 ms each)
    max_text_tokens: Optional[int] = None
    do_sample: Optional[bool] = None  # do_sample/temperature/top_k/top_p: codebook 0 (and the depth decoder)
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    depth_sampling: Optional[SamplingParams] = None  # codebooks 1..K-1 (default: as codebook 0)
    text_sampling: Optional[SamplingParams] = None  # the thinker (default: greedy)
    seed: Optional[int] = None
    generator: Optional[torch.Generator] = None
    stopping_criteria: tuple = ()
    chunk_frames: tuple = (2, 4, 8)
    decode_audio: bool = True
    cancel: object = None
    generation_config: object = None

    def resolve(self, model) -> "ChromaGenerationOptions":
        """A copy with max_new_tokens and sampling settled and validated, and the generator made from `seed`."""
        gen_cfg = self.generation_config
        if gen_cfg is None:
            gen_cfg = getattr(model, "generation_config", None)

        def setting(name, default):
            value = getattr(self, name)
            configured = getattr(gen_cfg, name, None) if value is None and gen_cfg is not None else None
            return value if value is not None else configured if configured is not None else default

        max_new_tokens = setting("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer (audio frames), got {max_new_tokens!r}")
        if self.seed is not None and self.generator is not None:
            raise ValueError("pass either seed or generator, not both")
        generator = self.generator
        if self.seed is not None:
            generator = torch.Generator(device=model.backbone_device_dtype()[0]).manual_seed(int(self.seed))
        published = PUBLISHED_AUDIO_SAMPLING
        return dataclasses.replace(
            self, max_new_tokens=max_new_tokens, do_sample=bool(setting("do_sample", published.do_sample)),
            temperature=float(setting("temperature", published.temperature)),
            top_k=int(setting("top_k", published.top_k)), top_p=float(setting("top_p", published.top_p)),
            text_sampling=self.text_sampling or SamplingParams(), seed=None, generator=generator,
        )

    def generator_for(self, model) -> "ChromaGenerator":
        """The `ChromaGenerator` these (resolved) options describe."""
        audio = SamplingParams(self.do_sample, self.temperature, self.top_k, self.top_p)
        return ChromaGenerator(model, audio, depth_sampling=self.depth_sampling, text_sampling=self.text_sampling,
                               generator=self.generator)


class ChromaGenerationMixin:
    """Adds `generate()`, `stream()` and `encode_voice()` to `ChromaForConditionalGeneration`. Not transformers'
    GenerationMixin: Chroma's loop interleaves three models, so it is written out in `ChromaGenerator` instead of
    hooked into private methods."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        input_values: Optional[torch.Tensor] = None,
        input_values_cutoffs: Optional[torch.Tensor] = None,
        thinker_input_ids: Optional[torch.LongTensor] = None,
        thinker_attention_mask: Optional[torch.Tensor] = None,
        thinker_input_features: Optional[torch.Tensor] = None,
        thinker_feature_attention_mask: Optional[torch.Tensor] = None,
        voice=None,
        forced_text_ids=None,
        max_new_tokens: Optional[int] = None,
        max_text_tokens: Optional[int] = None,
        do_sample: Optional[bool] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        depth_sampling: Optional[SamplingParams] = None,
        text_sampling: Optional[SamplingParams] = None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        stopping_criteria=(),
        streamer=None,
        return_dict_in_generate: bool = False,
        output_logits: bool = False,
        output_audio: bool = False,
        use_cache: bool = True,
        generation_config=None,
    ):
        """Answer a conversation in a reference voice.

        Inputs are what `ChromaProcessor` returns (the official names): the thinker prompt (`thinker_input_ids`
        [B, S], `thinker_attention_mask`, Whisper `thinker_input_features` [B, 128, M] and their
        `thinker_feature_attention_mask` [B, M]) and the reference voice (`input_ids` [B, P] transcript,
        `attention_mask`, `input_values` [B, 1, T] at 24 kHz, `input_values_cutoffs` [B] valid samples) — or,
        instead of the reference inputs, `voice`: a `ChromaVoice` (for every row) or a list of them.
        `forced_text_ids` (a list of 1-D id tensors, or [B, N] padded with -1) makes the model speak that text:
        the thinker is fed these ids (then <|im_end|>) instead of choosing its own (text-to-speech).

        max_new_tokens counts audio frames (80 ms each); max_text_tokens caps the thinker's answer (it then stops
        talking and the audio ends on its own). do_sample/temperature/top_k/top_p set the audio sampling (codebook 0
        and, unless `depth_sampling` is given, the depth decoder); text is greedy unless `text_sampling` says
        otherwise. `seed` or `generator` make sampling reproducible. `stopping_criteria`: callables
        `f(state) -> bool | BoolTensor[B]`. `streamer`: an object with `put(chunk)` / `end()` receiving
        `ChromaChunk`s (codes and text, no pcm) as they are produced.

        Returns codes [B, T, K] like the official code (so `codec_model.decode(out.permute(0, 2, 1)).audio_values`
        works), or with `return_dict_in_generate=True` a `ChromaGenerateOutput` that also carries the text ids,
        per-row lengths and finish reasons. `output_audio=True` also decodes the codes with Mimi: the output (a
        `ChromaGenerateOutput`, whatever `return_dict_in_generate` says) then carries `audio`, one float32 24 kHz
        waveform per row, cut to the row's `audio_lengths` frames.
        """
        if not use_cache:
            raise ValueError("Chroma generation always uses its KV caches; use_cache=False is not supported")
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, input_values=input_values,
                      input_values_cutoffs=input_values_cutoffs, thinker_input_ids=thinker_input_ids,
                      thinker_attention_mask=thinker_attention_mask, thinker_input_features=thinker_input_features,
                      thinker_feature_attention_mask=thinker_feature_attention_mask, voice=voice,
                      forced_text_ids=forced_text_ids)
        options = ChromaGenerationOptions(
            max_new_tokens=max_new_tokens, max_text_tokens=max_text_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, depth_sampling=depth_sampling,
            text_sampling=text_sampling, seed=seed, generator=generator, stopping_criteria=stopping_criteria,
            chunk_frames=1 if streamer is not None else 8, decode_audio=False, generation_config=generation_config,
        )
        chunks = self.stream_with_options(inputs, options)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration as stop:
                state = stop.value
                break
            if streamer is not None:
                streamer.put(chunk)
        if streamer is not None:
            streamer.end()
        output = collect_output(state, self.config)
        if not output_logits:
            output.logits = output.depth_logits = None
        if output_audio:
            output.audio = self.decode_audio(output.sequences, output.audio_lengths)
            return output
        return output if return_dict_in_generate else output.sequences

    @torch.no_grad()
    def stream(
        self,
        input_ids=None, attention_mask=None, input_values=None, input_values_cutoffs=None, thinker_input_ids=None,
        thinker_attention_mask=None, thinker_input_features=None, thinker_feature_attention_mask=None, voice=None,
        forced_text_ids=None, max_new_tokens=None, max_text_tokens=None, chunk_frames=(2, 4, 8), decode_audio=True,
        do_sample=None,
        temperature=None, top_k=None, top_p=None, depth_sampling=None, text_sampling=None, seed=None, generator=None,
        stopping_criteria=(), cancel=None, generation_config=None,
    ):
        """Like `generate()`, but an iterator of `ChromaChunk`s: new text ids, new codes and their 24 kHz pcm.

        The first chunk comes after `chunk_frames[0]` frames (2 by default = 160 ms of audio); later chunks follow
        `chunk_frames` (last entry repeated). Stop early with `cancel.set()` or by closing the iterator.
        Concatenated, the chunks hold exactly what `generate()` returns for the same inputs and seed. The iterator's
        return value (StopIteration.value) is the final `ChromaGenerationState`.
        """
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, input_values=input_values,
                      input_values_cutoffs=input_values_cutoffs, thinker_input_ids=thinker_input_ids,
                      thinker_attention_mask=thinker_attention_mask, thinker_input_features=thinker_input_features,
                      thinker_feature_attention_mask=thinker_feature_attention_mask, voice=voice,
                      forced_text_ids=forced_text_ids)
        options = ChromaGenerationOptions(
            max_new_tokens=max_new_tokens, max_text_tokens=max_text_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, depth_sampling=depth_sampling,
            text_sampling=text_sampling, seed=seed, generator=generator, stopping_criteria=stopping_criteria,
            chunk_frames=chunk_frames, decode_audio=decode_audio, cancel=cancel, generation_config=generation_config,
        )
        return (yield from self.stream_with_options(inputs, options))

    def stream_with_options(self, inputs: dict, options: ChromaGenerationOptions):
        """The one path behind `generate()` and `stream()`: `inputs` (the request: thinker prompt, reference voice or
        `voice`, `forced_text_ids`) and the options object.
        -> an iterator of `ChromaChunk`s returning the final `ChromaGenerationState`."""
        prepared = self.prepare_generation_inputs(**inputs)
        options = options.resolve(self)
        return (yield from options.generator_for(self).stream(
            prepared, options.max_new_tokens, max_text_tokens=options.max_text_tokens,
            chunk_frames=options.chunk_frames, decode_audio=options.decode_audio,
            stopping_criteria=options.stopping_criteria, cancel=options.cancel,
            reuse_voice_kv=inputs.get("voice") is not None,
        ))

    def backbone_device_dtype(self):
        """(device, dtype) of the backbone: where generation's caches, codes and voices live, and their float type
        (read from the audio table, which no quantizer converts; `model.device`/`.dtype` name the first parameter,
        the thinker's, and Mimi stays float32)."""
        table = self.backbone.audio_embedding.embed_audio_tokens.weight
        return table.device, table.dtype

    @torch.no_grad()
    def decode_audio(self, codes: torch.Tensor, audio_lengths: Optional[torch.Tensor] = None):
        """Audio codes [B, T, K] (what `generate()` returns) -> B float32 24 kHz waveforms [n_b], each cut to its
        `audio_lengths[b]` frames (all T without it). Mimi decodes the batch at once; it is causal, so a row's
        waveform does not depend on the frames after its end."""
        batch, frames, _ = codes.shape
        lengths = [frames] * batch if audio_lengths is None else [int(n) for n in audio_lengths]
        if frames == 0:
            return [codes.new_zeros(0, dtype=torch.float32) for _ in range(batch)]
        codec = self.codec_model
        real = codes.clamp(0, self.config.codebook_size - 1).to(codec.device)  # specials never reach Mimi
        audio = codec.decode(real.transpose(1, 2)).audio_values  # [B, 1, T * audio_frame_freq]
        return [audio[b, 0, : n * self.config.audio_frame_freq].float() for b, n in enumerate(lengths)]

    @torch.no_grad()
    def encode_voice(self, input_values: torch.Tensor, input_ids: torch.Tensor, transcript: Optional[str] = None):
        """Encode a reference voice once: 24 kHz waveform [T] / [1, T] / [1, 1, T] and its transcript ids [P] / [1, P]
        -> `ChromaVoice` (reusable, saveable). `processor.encode_voice(audio, text)` builds both inputs."""
        wave = input_values.reshape(1, 1, -1) if input_values.dim() < 3 else input_values
        ids = input_ids.reshape(-1) if input_ids.dim() == 2 and input_ids.shape[0] == 1 else input_ids
        if wave.shape[:2] != (1, 1) or ids.dim() != 1:
            raise ValueError("encode_voice takes one voice: input_values [T] (24 kHz) and input_ids [P]")
        if wave.shape[-1] == 0 or not bool(torch.isfinite(wave).all()):
            raise ValueError("the reference audio is empty or contains NaN/Inf samples")
        device = self.backbone_device_dtype()[0]
        codes = self.encode_audio(wave.to(device))[0]
        return ChromaVoice(text_ids=ids.to(device), codes=codes, transcript=transcript)

    def prepare_generation_inputs(self, voice=None, forced_text_ids=None, **inputs):
        """Validate generate()'s inputs (clear ValueErrors) and move them to the model's device.

        -> the dict `ChromaGenerator.start/stream` take (with `voices` and padded `forced_text_ids` when given);
        for callers that drive a `ChromaGenerator` themselves (a server, a benchmark)."""
        if inputs.get("thinker_input_ids") is None:
            raise ValueError("generate() needs thinker_input_ids: pass what ChromaProcessor returns for the conversation")
        batch = inputs["thinker_input_ids"].shape[0]
        device = self.backbone_device_dtype()[0]
        if voice is not None:
            voices = [ChromaVoice.coerce(v) for v in (voice if isinstance(voice, (list, tuple)) else [voice] * batch)]
            if len(voices) != batch or any(v is None for v in voices):
                raise ValueError(f"voice must be a ChromaVoice or a list of {batch} ChromaVoice")
            if inputs.get("input_values") is not None or inputs.get("input_ids") is not None:
                raise ValueError("pass either voice or the reference inputs (input_ids/input_values), not both")
        else:
            missing = [name for name in ("input_ids", "input_values") if inputs.get(name) is None]
            if missing:
                raise ValueError(
                    f"generate() needs {', '.join(missing)} (the reference voice: prompt_text and prompt_audio in "
                    "ChromaProcessor) or a `voice=` from encode_voice()"
                )
            values = inputs["input_values"]
            if values.dim() != 3 or values.shape[1] != 1:
                raise ValueError(f"input_values must be [B, 1, T] (24 kHz mono), got {tuple(values.shape)}")
            if values.shape[-1] == 0:
                raise ValueError("input_values is empty: the reference voice needs at least one sample")
            if not bool(torch.isfinite(values).all()):
                raise ValueError("input_values contains NaN or Inf samples")
            cutoffs = inputs["input_values_cutoffs"]
            if cutoffs is not None and (cutoffs.dim() != 1 or bool((cutoffs < 1).any())
                                        or bool((cutoffs > values.shape[-1]).any())):
                raise ValueError(
                    f"input_values_cutoffs must be [B] sample counts in 1..{values.shape[-1]}, got {cutoffs.tolist()}"
                )
        for name, value in inputs.items():
            # Whisper features hold one row per audio clip (any number per conversation), not one per conversation
            if value is not None and value.shape[0] != batch and not name.startswith("thinker_input_features") \
                    and name != "thinker_feature_attention_mask":
                raise ValueError(f"{name} has batch size {value.shape[0]}, thinker_input_ids has {batch}")
        if (inputs["thinker_input_features"] is None) != (inputs["thinker_feature_attention_mask"] is None):
            raise ValueError("thinker_input_features and thinker_feature_attention_mask go together")
        moved = {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}
        if voice is not None:
            moved["voices"] = voices
        if forced_text_ids is not None:
            moved["forced_text_ids"] = self._pad_forced_text(forced_text_ids, batch).to(device)
        return moved

    @staticmethod
    def _pad_forced_text(forced_text_ids, batch):
        if isinstance(forced_text_ids, torch.Tensor) and forced_text_ids.dim() == 2:
            rows = [r[r >= 0] for r in forced_text_ids]
        else:
            rows = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in forced_text_ids]
        if len(rows) != batch or any(r.numel() == 0 for r in rows):
            raise ValueError(f"forced_text_ids needs one non-empty id sequence per row ({batch} rows)")
        padded = torch.full((batch, max(r.numel() for r in rows)), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            padded[b, : r.numel()] = r
        return padded


__all__ = [
    "ChromaGenerationMixin", "ChromaGenerationOptions", "ChromaGenerator", "merge_states", "select_rows",
]
