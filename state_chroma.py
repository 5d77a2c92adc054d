# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""The per-request side of Chroma generation: preallocated KV caches and masks, sampling, reusable voices, the
generation state with its chunk and output types, and the operations that change the rows of a running batch
(`select_rows`, `merge_states`: continuous batching). The loop that drives them is `generation_chroma.py`.

Shapes: B batch, K codebooks, V audio vocabulary, D backbone width, S thinker tokens.
"""

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from transformers.utils import ModelOutput


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


def sample_rows(logits: torch.Tensor, params: List[SamplingParams], generators: List[Optional[torch.Generator]]):
    """logits [R, V] with one sampling `SamplingParams` (do_sample=True) and one generator per row -> ids [R].

    Row r gets exactly `sample_next_token(logits[r:r + 1], params[r], generators[r])` -- the same filters in the same
    float32 arithmetic, and one [1, V] draw from the row's own generator -- but the filtering runs batched (a server
    with many sampled rows would otherwise pay ~10 small ops per row, codebook and frame)."""
    rows, vocab = logits.shape
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    logits = logits.float() / temperature[:, None]
    top_k = [min(p.top_k, vocab) if p.top_k else 0 for p in params]
    if any(top_k):
        values = torch.topk(logits, max(top_k), dim=-1).values  # [R, k_max], descending
        kth = values.gather(1, torch.tensor([max(k, 1) - 1 for k in top_k], device=device)[:, None])
        kth = kth.masked_fill(torch.tensor([k == 0 for k in top_k], device=device)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)[:, None]
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cumulative - sorted_logits.softmax(-1) >= top_p) & (top_p < 1.0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    noise = torch.cat([torch.empty(1, vocab, device=device).exponential_(1, generator=g) for g in generators])
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
# Changing the rows of a running batch (continuous batching)
# ----------------------------------------------------------------------------------------------------------------------


def select_rows(state: ChromaGenerationState, rows, config) -> ChromaGenerationState:
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
        depth_cache=ChromaKVCache(config.decoder_config, len(index), config.audio_num_codebooks,
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

def merge_states(states: List[ChromaGenerationState], frames_left: int, config) -> ChromaGenerationState:
    """One state holding the rows of `states` (in order), to be decoded together from the next frame on.

    Every row keeps exactly its tokens, positions and validity: each state's filled backbone and thinker slots
    move so that they end at the common next slot, behind invalid slots that attention masks out (the left
    padding a batch of different prompt lengths has anyway), so each row's answer is the one it would get alone.
    The states must be at the same point of the text schedule (frame counts of equal parity), and each must
    have taken its first (prompt) step. `frames_left`: the most frames any row may still generate (sizes the
    caches). The merged state's output lists (frames, text ids, logits) start empty: take each state's output
    (`take_chunk`) before merging."""
    per_text = config.audio_frames_per_text_token
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
            texts.append(torch.nn.functional.pad(text, (0, width - text.shape[1]), value=config.im_end_token_id))
            rows.append(state.forced_rows if state.forced_rows is not None
                        else torch.full((batch,), state.forced_text is not None, device=text.device))
        forced_text, forced_rows = torch.cat(texts), torch.cat(rows)
    batch = sum(state.finished.shape[0] for state in states)
    return ChromaGenerationState(
        cache=cache, slot_valid=slot_valid, next_slot=filled, next_position=cat("next_position"),
        depth_cache=ChromaKVCache(config.decoder_config, batch, config.audio_num_codebooks,
                                  slot_valid.device, cache.keys[0].dtype),
        thinker_cache=thinker, thinker_mask=thinker_mask, thinker_next_position=cat("thinker_next_position"),
        thinker_alive=cat("thinker_alive"), last_text_id=cat("last_text_id"), text_count=cat("text_count"),
        forced_text=forced_text, forced_rows=forced_rows, finished=cat("finished"),
        frame_count=first.frame_count, row_frames=cat("row_frames"), last_frame=cat("last_frame"),
        thinker_may_talk=any(state.thinker_may_talk for state in states),
    )


__all__ = [
    "ChromaChunk", "ChromaGenerateOutput", "ChromaGenerationState", "ChromaKVCache", "ChromaVoice", "SamplingParams",
    "merge_states", "padding_causal_mask", "sample_next_token", "sample_rows", "select_rows",
]
