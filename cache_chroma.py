# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Key/value caches and attention masks of the backbone and depth decoder, and the text/audio schedule that decides
how many cache slots an answer needs.

Shapes: B batch, H_kv key/value heads, L new positions, D width.
"""

from typing import List

import torch


# ----------------------------------------------------------------------------------------------------------------------
# The text/audio schedule (the published 1:2 ratio: config.audio_frames_per_text_token = 2)
# ----------------------------------------------------------------------------------------------------------------------
#
#   backbone step s = 0       the prompt: [voice prefix, h_0, E(t_1)]
#   backbone step s >= 1      [frame_emb(frame s-1)], followed by one thinker pair [h_j, E(t_j+1)] when
#                             s % audio_frames_per_text_token == 0 and the row's thinker is still talking
#
# So n frames after the prompt take at most n frame slots plus 2 slots per pair, and the thinker takes one text step
# per pair. Every cache size below comes from this schedule.


def text_step_due(frame_count: int, frames_per_text: int) -> bool:
    """Whether the next backbone input carries a thinker pair, `frame_count` frames into the answer."""
    return frame_count % frames_per_text == 0


def backbone_slots_needed(frames: int, frames_per_text: int) -> int:
    """Backbone cache slots that `frames` more frames can use: one per frame, two per thinker pair."""
    return frames + 2 * (frames // frames_per_text + 1)


def thinker_steps_needed(frames: int, frames_per_text: int) -> int:
    """Thinker cache slots (text steps) that `frames` more frames can use."""
    return frames // frames_per_text + 2


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


__all__ = [
    "ChromaKVCache", "align_slots", "backbone_slots_needed", "left_pad", "padding_causal_mask", "text_step_due",
    "thinker_steps_needed",
]
