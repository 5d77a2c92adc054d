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

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput, logging


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Caches and masks
# ----------------------------------------------------------------------------------------------------------------------


class ChromaKVCache:
    """Preallocated key/value buffers for every layer of one Llama stack: [B, H_kv, capacity, head_dim] each.

    Positions in the buffer are *slots*; which slots a row may attend to is decided by the attention mask the caller
    builds from per-row validity, so rows of a batch can hold different numbers of real tokens.
    """

    def __init__(self, config, batch_size, capacity, device, dtype):
        shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.capacity = capacity

    def write(self, layer_idx, start, key, value):
        """Store key/value [B, H_kv, L, head_dim] at slots start..start+L; return the filled prefix of the buffers."""
        end = start + key.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} slots needed, capacity {self.capacity}")
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


def padding_causal_mask(valid: torch.Tensor, query_length: int) -> torch.Tensor:
    """Boolean attention mask [B, 1, Lq, Lk] (True = attend) for queries sitting at the last `query_length` slots.

    valid: [B, Lk] True where a slot holds a real token. A query attends to real slots at or before its own slot,
    and always to itself (a padding query then yields finite garbage instead of NaN; its output is never used).
    """
    total = valid.shape[-1]
    query_slots = torch.arange(total - query_length, total, device=valid.device)
    key_slots = torch.arange(total, device=valid.device)
    causal = key_slots[None, :] <= query_slots[:, None]  # [Lq, Lk]
    mask = (causal[None] & valid[:, None, :]) | (key_slots[None, :] == query_slots[:, None])[None]
    return mask[:, None]


def left_pad(rows: List[torch.Tensor]):
    """Rows [L_b, D] -> (padded [B, max L, D] with zeros on the left, valid [B, max L] bool)."""
    length = max(r.shape[0] for r in rows)
    padded = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    valid = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for b, r in enumerate(rows):
        if r.shape[0]:
            padded[b, length - r.shape[0]:] = r
            valid[b, length - r.shape[0]:] = True
    return padded, valid


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How one kind of token is chosen. `do_sample=False` is greedy (argmax) and ignores the rest."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self):
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if self.top_k is not None and self.top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {self.top_k}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator=None) -> torch.Tensor:
    """logits [B, V] -> ids [B]. Temperature, then top-k, then top-p (nucleus), then a categorical draw."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keeps the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------------
# Per-request state and output
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ChromaGenerationState:
    """Everything one batch of answers carries from step to step."""

    # backbone
    cache: "ChromaKVCache"
    slot_valid: torch.Tensor  # [B, capacity] bool: slot holds a real token of that row
    next_slot: int  # first free slot (shared by all rows)
    next_position: torch.Tensor  # [B] RoPE position of the row's next real token
    depth_cache: "ChromaKVCache"  # K slots, overwritten every frame
    # thinker
    thinker_cache: object  # transformers Cache
    thinker_mask: torch.Tensor  # [B, S + steps] 2-D attention mask
    thinker_next_position: torch.Tensor  # [B]
    thinker_alive: torch.Tensor  # [B] bool: has not emitted <|im_end|> yet
    last_text_id: torch.Tensor  # [B] the id the thinker reads at its next step
    last_text_hidden: Optional[torch.Tensor] = None  # [B, D]
    # outputs so far
    text_ids: List[torch.Tensor] = field(default_factory=list)  # each [B]
    text_valid: List[torch.Tensor] = field(default_factory=list)  # each [B] bool
    frames: List[torch.Tensor] = field(default_factory=list)  # each [B, K]
    frame_valid: List[torch.Tensor] = field(default_factory=list)  # each [B] bool: frame belongs to the answer
    finished: Optional[torch.Tensor] = None  # [B] bool
    c0_logits: List[torch.Tensor] = field(default_factory=list)  # each [B, V]
    depth_logits: List[torch.Tensor] = field(default_factory=list)  # each [B, K-1, V]


@dataclass
class ChromaGenerateOutput(ModelOutput):
    """Result of `generate(..., return_dict_in_generate=True)`.

    sequences: [B, T, K] audio codes, frame-major; frames past a row's end are 0 (a valid Mimi code), so
        `codec_model.decode(sequences.permute(0, 2, 1))` never fails; cut each row at `audio_lengths`.
    audio_lengths: [B] frames that belong to each row's answer.
    text_sequences: [B, N] thinker ids (ending with <|im_end|> when the thinker finished), right-padded with the
        thinker's pad id; `text_lengths` [B] gives the valid counts.
    logits: per backbone step, raw codebook-0 logits [B, V] (with `output_logits=True`).
    depth_logits: per frame, raw depth-decoder logits [B, K-1, V] (with `output_logits=True`).
    """

    sequences: Optional[torch.LongTensor] = None
    audio_lengths: Optional[torch.LongTensor] = None
    text_sequences: Optional[torch.LongTensor] = None
    text_lengths: Optional[torch.LongTensor] = None
    logits: Optional[tuple] = None
    depth_logits: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------------------------------


class ChromaGenerator:
    """Runs the Chroma loop on a `ChromaForConditionalGeneration`. Stateless itself: state lives in
    `ChromaGenerationState`, so one generator can serve many requests."""

    def __init__(self, model, audio_sampling: SamplingParams = SamplingParams(),
                 depth_sampling: Optional[SamplingParams] = None, generator: Optional[torch.Generator] = None):
        self.model = model
        self.config = model.config
        self.audio_sampling = audio_sampling
        self.depth_sampling = depth_sampling if depth_sampling is not None else audio_sampling
        self.generator = generator

    # -- prefill -------------------------------------------------------------------------------------------------------

    def thinker_prefill(self, input_ids, attention_mask, input_features=None, feature_attention_mask=None):
        """Run the thinker on the whole prompt. -> (cache, hidden [B, D], first id [B], next position [B])."""
        thinker = self.model.thinker
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Audio/text prompts use plain sequential positions on all three M-RoPE sections (Qwen2.5-Omni's rule for
        # non-visual tokens); computing them here keeps padding rows correct and leaves no state on the module.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs = {}
        if input_features is not None:
            kwargs["input_features"] = input_features.to(thinker.dtype)
            kwargs["feature_attention_mask"] = feature_attention_mask
        out = thinker(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions[None].expand(3, -1, -1),
            use_cache=True,
            output_hidden_states=True,
            **kwargs,
        )
        hidden = out.hidden_states[-1][:, -1]
        first_id = out.logits[:, -1].argmax(-1)
        return out.past_key_values, hidden, first_id, positions[:, -1] + 1

    def build_prompt(self, input_ids, attention_mask, input_values, input_values_cutoffs, thinker_hidden, first_id):
        """Backbone prompt per row, left-padded. -> (embeds [B, L, D], valid [B, L])."""
        model, config = self.model, self.config
        batch = thinker_hidden.shape[0]
        device = thinker_hidden.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ref_frames = [model.embed_frames(codes) for codes in self.encode_references(input_values, input_values_cutoffs)]
        markers = model.embed_text(torch.tensor([config.text_start_token_id, config.text_end_token_id], device=device))
        answer_start = torch.stack([thinker_hidden, model.embed_text(first_id)], dim=1)  # [B, 2, D]
        rows = []
        for b in range(batch):
            text = model.embed_text(input_ids[b][attention_mask[b].bool()].to(device))
            rows.append(torch.cat([
                markers[:1], text, markers[1:],
                ref_frames[b],
                markers.new_zeros(1, markers.shape[-1]),  # end of the reference audio
                answer_start[b],
            ]))
        return left_pad(rows)

    def encode_references(self, input_values, cutoffs=None):
        """Mimi codes of each row's reference clip, cut to its valid samples: a list of [F_b, K].

        Each clip is encoded at its own length, as a solo request would be: Mimi's last (partial) frame depends on
        what follows the clip, so encoding right-padded rows together would change it. Rows of equal length share
        one encoder call."""
        batch = input_values.shape[0]
        if cutoffs is None:
            cutoffs = torch.full((batch,), input_values.shape[-1])
        cutoffs = [int(c) for c in cutoffs]
        codes = [None] * batch
        for length in sorted(set(cutoffs)):
            rows = [b for b in range(batch) if cutoffs[b] == length]
            group = self.model.encode_audio(input_values[rows, :, :length])  # [len(rows), F, K]
            for i, b in enumerate(rows):
                codes[b] = group[i]
        return codes

    def start(self, inputs, max_new_tokens):
        """Prefill everything. -> (state, first backbone input [B, L, D], its validity [B, L])."""
        model, config = self.model, self.config
        cache, hidden, first_id, next_pos = self.thinker_prefill(
            inputs["thinker_input_ids"], inputs.get("thinker_attention_mask"),
            inputs.get("thinker_input_features"), inputs.get("thinker_feature_attention_mask"),
        )
        prompt, prompt_valid = self.build_prompt(
            inputs["input_ids"], inputs.get("attention_mask"), inputs["input_values"],
            inputs.get("input_values_cutoffs"), hidden, first_id,
        )
        batch, device, dtype = prompt.shape[0], prompt.device, prompt.dtype
        per_text = config.audio_frames_per_text_token
        capacity = prompt.shape[1] + max_new_tokens + 2 * (max_new_tokens // per_text + 1)
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
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
        )
        state.text_ids.append(first_id)
        state.text_valid.append(torch.ones(batch, dtype=torch.bool, device=device))
        return state, prompt, prompt_valid

    # -- one text step, one audio frame ------------------------------------------------------------------------------

    def text_step(self, state):
        """One thinker step on the last id. -> the pair [h_j, E(t_j+1)] [B, 2, D] and its validity [B] (rows whose
        thinker was still talking)."""
        thinker, config = self.model.thinker, self.config
        alive = state.thinker_alive
        pad_id = config.thinker_config.pad_token_id or 0
        ids = torch.where(alive, state.last_text_id, torch.full_like(state.last_text_id, pad_id))
        state.thinker_mask = torch.cat([state.thinker_mask, alive[:, None].to(state.thinker_mask.dtype)], dim=1)
        positions = state.thinker_next_position[None, :, None].expand(3, -1, 1)
        out = thinker(
            input_ids=ids[:, None],
            attention_mask=state.thinker_mask,
            position_ids=positions,
            past_key_values=state.thinker_cache,
            use_cache=True,
            output_hidden_states=True,
        )
        state.thinker_cache = out.past_key_values
        hidden = out.hidden_states[-1][:, -1]
        next_id = out.logits[:, -1].argmax(-1)
        state.thinker_next_position = state.thinker_next_position + alive.long()
        state.text_ids.append(next_id)
        state.text_valid.append(alive.clone())
        state.last_text_id = torch.where(alive, next_id, state.last_text_id)
        state.thinker_alive = alive & (next_id != config.im_end_token_id)
        pair = torch.stack([hidden, self.model.embed_text(next_id)], dim=1)
        return pair, alive

    def backbone_step(self, state, embeds, valid):
        """Append embeds [B, L, D] (valid [B, L]) to the backbone. -> post-norm hidden [B, D] and codebook-0 logits
        [B, V] at the last slot."""
        length = embeds.shape[1]
        start = state.next_slot
        state.slot_valid[:, start:start + length] = valid
        positions = state.next_position[:, None] + valid.long().cumsum(-1) - 1
        state.next_position = state.next_position + valid.long().sum(-1)
        state.next_slot = start + length
        mask = padding_causal_mask(state.slot_valid[:, : state.next_slot], length)
        hidden, logits = self.model.backbone(embeds, positions.clamp(min=0), mask, state.cache, start)
        return hidden[:, -1], logits[:, -1]

    def depth_step(self, state, backbone_hidden, c0):
        """Codebooks 1..K-1 for one frame. -> frame [B, K] and raw logits [B, K-1, V].

        Positions reproduce the official inference: the backbone state and A(c0) are both at position 0, then
        A(c_k) at position k (the 8 inputs sit at [0, 0, 1, ..., K-2])."""
        decoder, config = self.model.decoder, self.config
        batch = c0.shape[0]
        inputs = torch.stack([backbone_hidden, decoder.audio_embedding(c0, 0)], dim=1)  # [B, 2, D]
        positions = torch.zeros(batch, 2, dtype=torch.long, device=c0.device)
        codes, all_logits = [c0], []
        hidden = decoder(inputs, positions, None, state.depth_cache, 0)[:, -1]
        for k in range(1, config.audio_num_codebooks):
            if k > 1:
                step_input = decoder.audio_embedding(codes[-1], k - 1)[:, None]
                positions = torch.full((batch, 1), k - 1, dtype=torch.long, device=c0.device)
                hidden = decoder(step_input, positions, None, state.depth_cache, k)[:, -1]
            logits = decoder.codebook_logits(hidden, k)
            all_logits.append(logits)
            codes.append(self.choose_code(logits, self.depth_sampling))
        return torch.stack(codes, dim=-1), torch.stack(all_logits, dim=1)

    def choose_code(self, logits, params):
        """Sample a Mimi code: values >= codebook_size (2048..2050) are never chosen, so Mimi can decode every frame."""
        logits = logits.float().clone()
        logits[..., self.config.codebook_size:] = float("-inf")
        return sample_next_token(logits, params, self.generator)

    def audio_step(self, state, embeds, valid):
        """One backbone step plus the depth loop. -> frame [B, K]."""
        hidden, c0_logits = self.backbone_step(state, embeds, valid)
        c0 = self.choose_code(c0_logits, self.audio_sampling)
        frame, depth_logits = self.depth_step(state, hidden, c0)
        state.c0_logits.append(c0_logits)
        state.depth_logits.append(depth_logits)
        return frame

    def record_frame(self, state, frame):
        """Keep the frame for unfinished rows; finish rows whose frame is the EOS frame."""
        config = self.config
        eos = (frame[:, : config.audio_num_codebooks - 1] == config.codebook_eos_token_id).all(-1)
        keep = ~state.finished & ~(eos & (frame == config.codebook_eos_token_id).all(-1))
        state.frames.append(frame)
        state.frame_valid.append(keep)
        state.finished = state.finished | eos

    def next_input(self, state, frame):
        """The next backbone input: the frame's embedding, plus a thinker pair when the schedule says so."""
        frame_embed = self.model.embed_frames(frame)[:, None]  # [B, 1, D]
        frame_valid = torch.ones(frame.shape[0], 1, dtype=torch.bool, device=frame.device)
        due = len(state.frames) % self.config.audio_frames_per_text_token == 0
        if not (due and bool(state.thinker_alive.any())):
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
    def generate(self, inputs, max_new_tokens):
        state, embeds, valid = self.start(inputs, max_new_tokens)
        for _ in range(max_new_tokens):
            frame = self.audio_step(state, embeds, valid)
            self.record_frame(state, frame)
            if bool(state.finished.all()) or len(state.frames) == max_new_tokens:
                break
            embeds, valid = self.next_input(state, frame)
        return state

    def finalize(self, state) -> ChromaGenerateOutput:
        """Collect the state's frames and text into padded tensors."""
        config = self.config
        batch = state.finished.shape[0]
        device = state.finished.device
        k = config.audio_num_codebooks
        if state.frames:
            frames = torch.stack(state.frames, dim=1)  # [B, steps, K]
            keep = torch.stack(state.frame_valid, dim=1)  # [B, steps]
        else:
            frames = torch.zeros(batch, 0, k, dtype=torch.long, device=device)
            keep = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        audio_lengths = keep.sum(-1)
        # kept frames are a prefix of each row (rows only stop), so masking is enough
        longest = int(audio_lengths.max()) if audio_lengths.numel() else 0
        sequences = torch.where(keep[..., None], frames, torch.zeros_like(frames))[:, :longest]
        text = torch.stack(state.text_ids, dim=1)
        text_valid = torch.stack(state.text_valid, dim=1)
        pad_id = config.thinker_config.pad_token_id or 0
        text_lengths = text_valid.sum(-1)
        text = torch.where(text_valid, text, torch.full_like(text, pad_id))[:, : int(text_lengths.max())]
        return ChromaGenerateOutput(
            sequences=sequences,
            audio_lengths=audio_lengths,
            text_sequences=text,
            text_lengths=text_lengths,
            logits=tuple(state.c0_logits),
            depth_logits=tuple(state.depth_logits),
        )


# ----------------------------------------------------------------------------------------------------------------------
# The model-facing entry point
# ----------------------------------------------------------------------------------------------------------------------

# generate() defaults = the published generation settings (transformers 5.0.0rc0 GenerationConfig defaults).
DEFAULT_MAX_NEW_TOKENS = 1000


class ChromaGenerationMixin:
    """Adds `generate()` to `ChromaForConditionalGeneration`. Not transformers' GenerationMixin: Chroma's loop
    interleaves three models, so it is written out in `ChromaGenerator` instead of hooked into private methods."""

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
        max_new_tokens: Optional[int] = None,
        do_sample: Optional[bool] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        return_dict_in_generate: bool = False,
        output_logits: bool = False,
        use_cache: bool = True,
        generation_config=None,
    ):
        """Answer a conversation in the reference voice.

        Inputs are what `ChromaProcessor` returns (the official names): the thinker prompt (`thinker_input_ids`
        [B, S], `thinker_attention_mask`, Whisper `thinker_input_features` [B, 128, M] and their
        `thinker_feature_attention_mask` [B, M]) and the reference voice (`input_ids` [B, P] transcript,
        `attention_mask`, `input_values` [B, 1, T] at 24 kHz, `input_values_cutoffs` [B] valid samples).

        max_new_tokens counts audio frames (80 ms each). Sampling (do_sample/temperature/top_k/top_p) applies to the
        audio codes; text is greedy, as published. Returns codes [B, T, K] like the official code (so
        `codec_model.decode(out.permute(0, 2, 1)).audio_values` works), or with `return_dict_in_generate=True` a
        `ChromaGenerateOutput` that also carries the text ids and per-row lengths.
        """
        if not use_cache:
            raise ValueError("Chroma generation always uses its KV caches; use_cache=False is not supported")
        gen_cfg = generation_config if generation_config is not None else getattr(self, "generation_config", None)

        def setting(value, name, default):
            if value is not None:
                return value
            configured = getattr(gen_cfg, name, None) if gen_cfg is not None else None
            return configured if configured is not None else default

        max_new_tokens = setting(max_new_tokens, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer (audio frames), got {max_new_tokens!r}")
        sampling = SamplingParams(
            do_sample=bool(setting(do_sample, "do_sample", False)),
            temperature=float(setting(temperature, "temperature", 1.0)),
            top_k=int(setting(top_k, "top_k", 50)),
            top_p=float(setting(top_p, "top_p", 1.0)),
        )
        inputs = self._check_generate_inputs(
            input_ids=input_ids, attention_mask=attention_mask, input_values=input_values,
            input_values_cutoffs=input_values_cutoffs, thinker_input_ids=thinker_input_ids,
            thinker_attention_mask=thinker_attention_mask, thinker_input_features=thinker_input_features,
            thinker_feature_attention_mask=thinker_feature_attention_mask,
        )
        runner = ChromaGenerator(self, sampling, generator=generator)
        output = runner.finalize(runner.generate(inputs, max_new_tokens))
        if not output_logits:
            output.logits = output.depth_logits = None
        return output if return_dict_in_generate else output.sequences

    def _check_generate_inputs(self, **inputs):
        """Validate shapes and move everything to the model's device."""
        required = ("input_ids", "input_values", "thinker_input_ids")
        missing = [name for name in required if inputs.get(name) is None]
        if missing:
            raise ValueError(
                f"generate() needs {', '.join(missing)}: pass what ChromaProcessor returns (a conversation plus "
                "prompt_audio and prompt_text for the voice)"
            )
        if inputs["input_values"].dim() != 3 or inputs["input_values"].shape[1] != 1:
            raise ValueError(f"input_values must be [B, 1, T] (24 kHz mono), got {tuple(inputs['input_values'].shape)}")
        batch = inputs["thinker_input_ids"].shape[0]
        for name, value in inputs.items():
            if value is not None and value.shape[0] != batch:
                raise ValueError(f"{name} has batch size {value.shape[0]}, thinker_input_ids has {batch}")
        if inputs["input_values"].shape[-1] == 0:
            raise ValueError("input_values is empty: the reference voice needs at least one sample")
        if not bool(torch.isfinite(inputs["input_values"]).all()):
            raise ValueError("input_values contains NaN or Inf samples")
        cutoffs = inputs["input_values_cutoffs"]
        if cutoffs is not None and (cutoffs.dim() != 1 or bool((cutoffs < 1).any())
                                    or bool((cutoffs > inputs["input_values"].shape[-1]).any())):
            raise ValueError(
                f"input_values_cutoffs must be [B] sample counts in 1..{inputs['input_values'].shape[-1]}, "
                f"got {cutoffs.tolist()}"
            )
        if (inputs["thinker_input_features"] is None) != (inputs["thinker_feature_attention_mask"] is None):
            raise ValueError("thinker_input_features and thinker_feature_attention_mask go together")
        device = self.backbone.codebook0_head.weight.device
        return {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}


__all__ = ["ChromaGenerator", "ChromaGenerateOutput", "ChromaGenerationState", "SamplingParams", "sample_next_token"]
