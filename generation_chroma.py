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
import weakref
from dataclasses import dataclass, field
from typing import List, Optional

import torch
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

    @classmethod
    def from_buffers(cls, keys: List[torch.Tensor], values: List[torch.Tensor]) -> "ChromaKVCache":
        """A cache over existing buffers [B, H_kv, capacity, head_dim] per layer."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.capacity = list(keys), list(values), keys[0].shape[2]
        return cache

    def write(self, layer_idx, start, key, value):
        """Store key/value [B, H_kv, L, head_dim] at slots start..start+L; return the filled prefix of the buffers.

        With `start` a LongTensor of the L slot indices (the static-shape path), the whole buffers are returned so
        every step has the same shapes (the attention mask then hides the unused slots)."""
        if isinstance(start, torch.Tensor):
            self.keys[layer_idx].index_copy_(2, start, key)
            self.values[layer_idx].index_copy_(2, start, value)
            return self.keys[layer_idx], self.values[layer_idx]
        end = start + key.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} slots needed, capacity {self.capacity}")
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


def align_slots(parts: List[torch.Tensor], ends: List[int], total: int, filled: int, dim: int = -1) -> torch.Tensor:
    """Stack batches of slot buffers along rows, moving part i's first `ends[i]` slots (along `dim`) to end at slot
    `filled` of a buffer with `total` slots; the slots before them are zeros (False), i.e. left padding.

    parts: [B_i, ..., S_i, ...] -> [sum B_i, ..., total, ...]."""
    dim = dim % parts[0].dim()
    shape = list(parts[0].shape)
    shape[0], shape[dim] = sum(p.shape[0] for p in parts), total
    out = parts[0].new_zeros(shape)
    row = 0
    for part, end in zip(parts, ends):
        out[row:row + part.shape[0]].narrow(dim, filled - end, end).copy_(part.narrow(dim, 0, end))
        row += part.shape[0]
    return out


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
    # a categorical draw as argmax(p / E), E ~ Exp(1): no host sync (torch.multinomial checks its input on the host)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Voices
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ChromaVoice:
    """A reference voice, encoded once and reused across requests and batch rows.

    text_ids: [P] thinker-vocabulary ids of the reference transcript.
    codes: [F, K] Mimi codes of the reference recording.
    The backbone prompt prefix it stands for is [E(text_start), E(text_ids), E(text_end), frame_emb(codes), 0];
    its key/value cache is computed on first use with a model and kept (per model, device and dtype).
    """

    text_ids: torch.Tensor
    codes: torch.Tensor
    transcript: Optional[str] = None
    _prefix_kv: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.text_ids.dim() != 1 or self.codes.dim() != 2:
            raise ValueError(f"ChromaVoice wants text_ids [P] and codes [F, K], got {tuple(self.text_ids.shape)} "
                             f"and {tuple(self.codes.shape)}")
        if self.codes.shape[0] == 0:
            raise ValueError("ChromaVoice needs at least one audio frame")

    def prefix_embeddings(self, model) -> torch.Tensor:
        """The backbone prompt prefix [P + F + 3, D]."""
        config, device = model.config, model.backbone.codebook0_head.weight.device
        markers = model.embed_text(torch.tensor([config.text_start_token_id, config.text_end_token_id], device=device))
        return torch.cat([
            markers[:1], model.embed_text(self.text_ids.to(device)), markers[1:],
            model.embed_frames(self.codes.to(device)),
            markers.new_zeros(1, markers.shape[-1]),  # end of the reference audio
        ])

    def prefix_kv(self, model):
        """Per backbone layer (key, value) [H_kv, L, head_dim] of the prefix; computed once per model/device/dtype."""
        device, dtype = model.backbone.codebook0_head.weight.device, model.backbone.codebook0_head.weight.dtype
        key = (id(model), str(device), dtype)
        cached = self._prefix_kv.get(key)
        if cached is not None and cached[0]() is model:
            return cached[1]
        embeds = self.prefix_embeddings(model)[None]
        cache = ChromaKVCache(model.config.backbone_config, 1, embeds.shape[1], device, dtype)
        with torch.no_grad():
            model.backbone(embeds, torch.arange(embeds.shape[1], device=device)[None], None, cache, 0)
        kv = [(k[0], v[0]) for k, v in zip(cache.keys, cache.values)]
        self._prefix_kv[key] = (weakref.ref(model), kv)
        return kv

    def save(self, path):
        """Write the voice as safetensors (codes, transcript ids, transcript text in the metadata)."""
        from safetensors.torch import save_file

        metadata = {"format": "chroma-voice-v1", "transcript": self.transcript or ""}
        save_file({"text_ids": self.text_ids.cpu().contiguous(), "codes": self.codes.cpu().contiguous()},
                  str(path), metadata=metadata)

    @classmethod
    def load(cls, path) -> "ChromaVoice":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != "chroma-voice-v1":
                raise ValueError(f"{path} is not a Chroma voice file (format {metadata.get('format')!r})")
            return cls(text_ids=f.get_tensor("text_ids"), codes=f.get_tensor("codes"),
                       transcript=metadata.get("transcript") or None)


# ----------------------------------------------------------------------------------------------------------------------
# Per-request state, chunks and output
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ChromaGenerationState:
    """Everything one batch of answers carries from step to step."""

    # backbone
    cache: ChromaKVCache
    slot_valid: torch.Tensor  # [B, capacity] bool: slot holds a real token of that row
    next_slot: int  # first free slot (shared by all rows)
    next_position: torch.Tensor  # [B] RoPE position of the row's next real token
    depth_cache: ChromaKVCache  # K slots, overwritten every frame
    # thinker
    thinker_cache: object  # ChromaThinkerCache (fast path) or the transformers Cache (reference path)
    thinker_mask: torch.Tensor  # [B, S (+ steps on the reference path)] 2-D attention mask
    thinker_next_position: torch.Tensor  # [B]
    thinker_alive: torch.Tensor  # [B] bool: still talking (no <|im_end|>, under max_text_tokens)
    last_text_id: torch.Tensor  # [B] the id the thinker reads at its next step
    text_count: torch.Tensor  # [B] text ids produced so far
    forced_text: Optional[torch.Tensor]  # [B, N + 1] the text to speak, <|im_end|>-padded (None: the thinker answers)
    # outputs so far
    finished: torch.Tensor  # [B] bool: row's answer is complete (EOS frame, stopping criterion or cancel)
    forced_rows: Optional[torch.Tensor] = None  # [B] bool: rows that speak forced_text (None: all, if it is set)
    frame_count: int = 0  # frames generated so far (the text schedule's clock; shared by all rows)
    row_frames: Optional[torch.Tensor] = None  # [B] frames each row has generated (rows of merged states differ)
    last_frame: Optional[torch.Tensor] = None  # [B, K] the latest frame: the next backbone input
    text_ids: List[torch.Tensor] = field(default_factory=list)  # each [B]
    text_valid: List[torch.Tensor] = field(default_factory=list)  # each [B] bool
    frames: List[torch.Tensor] = field(default_factory=list)  # each [B, K]
    frame_valid: List[torch.Tensor] = field(default_factory=list)  # each [B] bool: frame belongs to the answer
    c0_logits: List[torch.Tensor] = field(default_factory=list)  # each [B, V]
    depth_logits: List[torch.Tensor] = field(default_factory=list)  # each [B, K-1, V]
    cancelled: bool = False
    thinker_may_talk: bool = True  # host-side hint: some row's thinker was alive at the last sync


@dataclass
class ChromaChunk:
    """What `stream()` yields: the text and audio produced since the previous chunk.

    text_ids: per row, the new thinker ids [n_b] (LongTensor; may be empty).
    audio_codes: [B, n, K] the new frames (0 after a row's end); audio_valid [B, n] marks the row's own frames.
    pcm: [B, n * audio_frame_freq] float 24 kHz audio of these frames (None with decode_audio=False); streamed
        through a stateful Mimi decoder, so concatenating the chunks' pcm equals decoding all codes at once.
    finished: [B] the row's answer is complete. frame_offset: index of this chunk's first frame.
    """

    text_ids: List[torch.Tensor]
    audio_codes: torch.Tensor
    audio_valid: torch.Tensor
    pcm: Optional[torch.Tensor]
    finished: torch.Tensor
    frame_offset: int


@dataclass
class ChromaGenerateOutput(ModelOutput):
    """Result of `generate(..., return_dict_in_generate=True)`.

    sequences: [B, T, K] audio codes, frame-major; frames past a row's end are 0 (a valid Mimi code), so
        `codec_model.decode(sequences.permute(0, 2, 1))` never fails; cut each row at `audio_lengths`.
    audio_lengths: [B] frames that belong to each row's answer.
    text_sequences: [B, N] thinker ids (ending with <|im_end|> when the thinker finished), right-padded with the
        thinker's pad id; `text_lengths` [B] gives the valid counts.
    finish_reasons: per row "stop" (EOS frame or a stopping criterion), "length" (max_new_tokens) or "cancelled".
    logits: per backbone step, raw codebook-0 logits [B, V] (with `output_logits=True`).
    depth_logits: per frame, raw depth-decoder logits [B, K-1, V] (with `output_logits=True`).
    """

    sequences: Optional[torch.LongTensor] = None
    audio_lengths: Optional[torch.LongTensor] = None
    text_sequences: Optional[torch.LongTensor] = None
    text_lengths: Optional[torch.LongTensor] = None
    finish_reasons: Optional[list] = None
    logits: Optional[tuple] = None
    depth_logits: Optional[tuple] = None


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
            device = model.backbone.codebook0_head.weight.device
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            self.compiled_frame_step = torch.compile(self.frame_step, mode=mode, dynamic=False)

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
        hidden = out.hidden_states[-1][:, -1]  # post final norm: the lm_head input
        first_id = sample_next_token(out.logits[:, -1], self.text_sampling, self.generator)
        return out.past_key_values, hidden, first_id, positions[:, -1] + 1

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
        capacity = length + max_new_tokens + 2 * (max_new_tokens // per_text + 1)
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
            text_steps = max_new_tokens // per_text + 2
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
        due = state.frame_count % self.config.audio_frames_per_text_token == 0
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

    # -- changing the rows of a running batch (continuous batching) ----------------------------------------------------

    def select_rows(self, state, rows) -> ChromaGenerationState:
        """The state of `rows` (row indices, in the new order) alone, e.g. without the rows whose answers ended.
        Each kept row continues exactly as it would have in the full batch."""
        index = torch.as_tensor(rows, dtype=torch.long, device=state.finished.device)

        def pick(tensor):
            return None if tensor is None else tensor.index_select(0, index)

        thinker = state.thinker_cache
        if not hasattr(thinker, "valid"):
            raise ValueError("changing the rows of a batch needs the static thinker path (static_thinker=True)")
        backbone = ChromaKVCache.from_buffers([pick(k) for k in state.cache.keys], [pick(v) for v in state.cache.values])
        return dataclasses.replace(
            state,
            cache=backbone, slot_valid=pick(state.slot_valid), next_position=pick(state.next_position),
            depth_cache=ChromaKVCache(self.config.decoder_config, len(index), self.config.audio_num_codebooks,
                                      index.device, state.cache.keys[0].dtype),
            thinker_cache=type(thinker)([pick(k) for k in thinker.keys], [pick(v) for v in thinker.values],
                                        pick(thinker.valid), thinker.length),
            thinker_mask=pick(state.thinker_mask), thinker_next_position=pick(state.thinker_next_position),
            thinker_alive=pick(state.thinker_alive), last_text_id=pick(state.last_text_id),
            text_count=pick(state.text_count), forced_text=pick(state.forced_text), forced_rows=pick(state.forced_rows),
            finished=pick(state.finished), row_frames=pick(state.row_frames), last_frame=pick(state.last_frame),
            text_ids=[pick(t) for t in state.text_ids], text_valid=[pick(t) for t in state.text_valid],
            frames=[pick(t) for t in state.frames], frame_valid=[pick(t) for t in state.frame_valid],
            c0_logits=[pick(t) for t in state.c0_logits], depth_logits=[pick(t) for t in state.depth_logits],
        )

    def merge_states(self, states: List[ChromaGenerationState], frames_left: int) -> ChromaGenerationState:
        """One state holding the rows of `states` (in order), to be decoded together from the next frame on.

        Every row keeps exactly its tokens, positions and validity: each state's filled backbone and thinker slots
        move so that they end at the common next slot, behind invalid slots that attention masks out (the left
        padding a batch of different prompt lengths has anyway), so each row's answer is the one it would get alone.
        The states must be at the same point of the text schedule (frame counts of equal parity), and each must
        have taken its first (prompt) step. `frames_left`: the most frames any row may still generate (sizes the
        caches). The merged state's output lists (frames, text ids, logits) start empty: take each state's output
        (`take_chunk`) before merging."""
        per_text = self.config.audio_frames_per_text_token
        if len({state.frame_count % per_text for state in states}) != 1:
            raise ValueError("states at different points of the text schedule cannot be merged")
        if any(state.last_frame is None for state in states):
            raise ValueError("every state must have taken its prompt step before merging")
        if any(not hasattr(state.thinker_cache, "valid") for state in states):
            raise ValueError("merging needs the static thinker path (static_thinker=True)")
        first = states[0]
        # backbone: slots [0, filled) used; the rest of the answers needs at most this many more
        filled = max(state.next_slot for state in states)
        total = filled + frames_left + 2 * (frames_left // per_text + 1)
        ends = [state.next_slot for state in states]
        layers = range(len(first.cache.keys))
        cache = ChromaKVCache.from_buffers(
            [align_slots([state.cache.keys[i] for state in states], ends, total, filled, dim=2) for i in layers],
            [align_slots([state.cache.values[i] for state in states], ends, total, filled, dim=2) for i in layers],
        )
        slot_valid = align_slots([state.slot_valid for state in states], ends, total, filled)
        # thinker: one text step per `per_text` frames
        t_filled = max(state.thinker_cache.length for state in states)
        t_total = t_filled + frames_left // per_text + 2
        t_ends = [state.thinker_cache.length for state in states]
        t_layers = range(len(first.thinker_cache.keys))
        thinker = type(first.thinker_cache)(
            [align_slots([s.thinker_cache.keys[i] for s in states], t_ends, t_total, t_filled, dim=2) for i in t_layers],
            [align_slots([s.thinker_cache.values[i] for s in states], t_ends, t_total, t_filled, dim=2)
             for i in t_layers],
            align_slots([state.thinker_cache.valid for state in states], t_ends, t_total, t_filled), t_filled,
        )
        masks = [state.thinker_mask for state in states]
        width = max(m.shape[1] for m in masks)
        thinker_mask = align_slots(masks, [m.shape[1] for m in masks], width, width)

        def cat(name):
            return torch.cat([getattr(state, name) for state in states])

        forced_text = forced_rows = None
        if any(state.forced_text is not None for state in states):  # pad every text with <|im_end|> to one width
            width = max(state.forced_text.shape[1] for state in states if state.forced_text is not None)
            texts, rows = [], []
            for state in states:
                batch = state.finished.shape[0]
                text = state.forced_text if state.forced_text is not None else state.last_text_id.new_zeros(batch, 0)
                texts.append(torch.nn.functional.pad(text, (0, width - text.shape[1]), value=self.config.im_end_token_id))
                rows.append(state.forced_rows if state.forced_rows is not None
                            else torch.full((batch,), state.forced_text is not None, device=text.device))
            forced_text, forced_rows = torch.cat(texts), torch.cat(rows)
        batch = sum(state.finished.shape[0] for state in states)
        return ChromaGenerationState(
            cache=cache, slot_valid=slot_valid, next_slot=filled, next_position=cat("next_position"),
            depth_cache=ChromaKVCache(self.config.decoder_config, batch, self.config.audio_num_codebooks,
                                      slot_valid.device, cache.keys[0].dtype),
            thinker_cache=thinker, thinker_mask=thinker_mask, thinker_next_position=cat("thinker_next_position"),
            thinker_alive=cat("thinker_alive"), last_text_id=cat("last_text_id"), text_count=cat("text_count"),
            forced_text=forced_text, forced_rows=forced_rows, finished=cat("finished"),
            frame_count=first.frame_count, row_frames=cat("row_frames"), last_frame=cat("last_frame"),
            thinker_may_talk=any(state.thinker_may_talk for state in states),
        )


def collect_output(state, config) -> ChromaGenerateOutput:
    """Collect a finished state's frames and text into padded tensors."""
    batch, device = state.finished.shape[0], state.finished.device
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
    reasons = ["cancelled" if state.cancelled and not done else "stop" if done else "length"
               for done in state.finished.tolist()]
    return ChromaGenerateOutput(
        sequences=sequences,
        audio_lengths=audio_lengths,
        text_sequences=text,
        text_lengths=text_lengths,
        finish_reasons=reasons,
        logits=tuple(state.c0_logits),
        depth_logits=tuple(state.depth_logits),
    )


# ----------------------------------------------------------------------------------------------------------------------
# The model-facing entry points
# ----------------------------------------------------------------------------------------------------------------------

# Cache capacities of the compiled path are rounded up to a multiple of this many slots.
CACHE_BUCKET = 512

# Defaults = the published generation settings (transformers 5.0.0rc0 GenerationConfig defaults, max 1000 frames).
DEFAULT_MAX_NEW_TOKENS = 1000


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
        per-row lengths and finish reasons.
        """
        if not use_cache:
            raise ValueError("Chroma generation always uses its KV caches; use_cache=False is not supported")
        chunks = self.stream(
            input_ids=input_ids, attention_mask=attention_mask, input_values=input_values,
            input_values_cutoffs=input_values_cutoffs, thinker_input_ids=thinker_input_ids,
            thinker_attention_mask=thinker_attention_mask, thinker_input_features=thinker_input_features,
            thinker_feature_attention_mask=thinker_feature_attention_mask, voice=voice,
            forced_text_ids=forced_text_ids, max_new_tokens=max_new_tokens, max_text_tokens=max_text_tokens,
            chunk_frames=1 if streamer is not None else 8, decode_audio=False, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, depth_sampling=depth_sampling,
            text_sampling=text_sampling, seed=seed, generator=generator, stopping_criteria=stopping_criteria,
            generation_config=generation_config,
        )
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
        inputs = self.prepare_generation_inputs(
            input_ids=input_ids, attention_mask=attention_mask, input_values=input_values,
            input_values_cutoffs=input_values_cutoffs, thinker_input_ids=thinker_input_ids,
            thinker_attention_mask=thinker_attention_mask, thinker_input_features=thinker_input_features,
            thinker_feature_attention_mask=thinker_feature_attention_mask, voice=voice,
            forced_text_ids=forced_text_ids,
        )
        runner, max_new_tokens = self._make_generator(
            generation_config, max_new_tokens, do_sample, temperature, top_k, top_p, depth_sampling, text_sampling,
            seed, generator,
        )
        return (yield from runner.stream(
            inputs, max_new_tokens, max_text_tokens=max_text_tokens, chunk_frames=chunk_frames,
            decode_audio=decode_audio, stopping_criteria=stopping_criteria, cancel=cancel,
            reuse_voice_kv=voice is not None,
        ))

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
        device = self.backbone.codebook0_head.weight.device
        codes = self.encode_audio(wave.to(device))[0]
        return ChromaVoice(text_ids=ids.to(device), codes=codes, transcript=transcript)

    def _make_generator(self, generation_config, max_new_tokens, do_sample, temperature, top_k, top_p,
                        depth_sampling, text_sampling, seed, generator):
        gen_cfg = generation_config if generation_config is not None else getattr(self, "generation_config", None)

        def setting(value, name, default):
            if value is not None:
                return value
            configured = getattr(gen_cfg, name, None) if gen_cfg is not None else None
            return configured if configured is not None else default

        max_new_tokens = setting(max_new_tokens, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer (audio frames), got {max_new_tokens!r}")
        audio = SamplingParams(
            do_sample=bool(setting(do_sample, "do_sample", False)),
            temperature=float(setting(temperature, "temperature", 1.0)),
            top_k=int(setting(top_k, "top_k", 50)),
            top_p=float(setting(top_p, "top_p", 1.0)),
        )
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None:
            generator = torch.Generator(device=self.backbone.codebook0_head.weight.device).manual_seed(int(seed))
        runner = ChromaGenerator(self, audio, depth_sampling=depth_sampling,
                                 text_sampling=text_sampling or SamplingParams(), generator=generator)
        return runner, max_new_tokens

    def prepare_generation_inputs(self, voice=None, forced_text_ids=None, **inputs):
        """Validate generate()'s inputs (clear ValueErrors) and move them to the model's device.

        -> the dict `ChromaGenerator.start/stream` take (with `voices` and padded `forced_text_ids` when given);
        for callers that drive a `ChromaGenerator` themselves (a server, a benchmark)."""
        if inputs.get("thinker_input_ids") is None:
            raise ValueError("generate() needs thinker_input_ids: pass what ChromaProcessor returns for the conversation")
        batch = inputs["thinker_input_ids"].shape[0]
        device = self.backbone.codebook0_head.weight.device
        if voice is not None:
            voices = list(voice) if isinstance(voice, (list, tuple)) else [voice] * batch
            if len(voices) != batch or not all(isinstance(v, ChromaVoice) for v in voices):
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
    "ChromaChunk", "ChromaGenerator", "ChromaGenerateOutput", "ChromaGenerationState", "ChromaVoice",
    "SamplingParams", "sample_next_token",
]
