# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Continuous batching: change the rows of a running batch between frames. `select_rows` keeps some rows (e.g.
drops finished answers); `merge_states` joins states started separately into one batch. Every row keeps exactly the
answer it would get alone.

Shapes: B batch, H_kv key/value heads, S slots.
"""

import dataclasses
from typing import List

import torch

from .cache_chroma import ChromaKVCache, align_slots, backbone_slots_needed, thinker_steps_needed
from .state_chroma import ChromaGenerationState


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
    check_mergeable(states, config.audio_frames_per_text_token)
    cache, slot_valid, next_slot = merge_backbone(states, frames_left, config.audio_frames_per_text_token)
    thinker_cache, thinker_mask = merge_thinker(states, frames_left, config.audio_frames_per_text_token)
    forced_text, forced_rows = merge_forced_text(states, config.im_end_token_id)
    batch = sum(state.finished.shape[0] for state in states)

    def cat(name):
        return torch.cat([getattr(state, name) for state in states])

    return ChromaGenerationState(
        cache=cache, slot_valid=slot_valid, next_slot=next_slot, next_position=cat("next_position"),
        depth_cache=ChromaKVCache(config.decoder_config, batch, config.audio_num_codebooks,
                                  slot_valid.device, cache.keys[0].dtype),
        thinker_cache=thinker_cache, thinker_mask=thinker_mask, thinker_next_position=cat("thinker_next_position"),
        thinker_alive=cat("thinker_alive"), last_text_id=cat("last_text_id"), text_count=cat("text_count"),
        forced_text=forced_text, forced_rows=forced_rows, finished=cat("finished"),
        frame_count=states[0].frame_count, row_frames=cat("row_frames"), last_frame=cat("last_frame"),
        thinker_may_talk=any(state.thinker_may_talk for state in states),
    )


def check_mergeable(states, frames_per_text):
    if len({state.frame_count % frames_per_text for state in states}) != 1:
        raise ValueError("states at different points of the text schedule cannot be merged")
    if any(state.last_frame is None for state in states):
        raise ValueError("every state must have taken its prompt step before merging")
    if any(not hasattr(state.thinker_cache, "valid") for state in states):
        raise ValueError("merging needs the static thinker path (static_thinker=True)")


def align_layers(per_state_buffers, ends, total, filled):
    """Per layer, the states' [B_i, H_kv, S_i, hd] buffers stacked along rows with their filled slots ending at
    `filled` of `total` slots. per_state_buffers: one list of layer buffers per state."""
    return [align_slots(list(layer), ends, total, filled, dim=2) for layer in zip(*per_state_buffers)]


def merge_backbone(states, frames_left, frames_per_text):
    """-> (backbone cache, slot validity [B, total], next slot). Slots [0, filled) are in use; the rest of the
    answers needs at most `backbone_slots_needed(frames_left)` more."""
    ends = [state.next_slot for state in states]
    filled = max(ends)
    total = filled + backbone_slots_needed(frames_left, frames_per_text)
    cache = ChromaKVCache.from_buffers(align_layers([s.cache.keys for s in states], ends, total, filled),
                                       align_layers([s.cache.values for s in states], ends, total, filled))
    return cache, align_slots([s.slot_valid for s in states], ends, total, filled), filled


def merge_thinker(states, frames_left, frames_per_text):
    """-> (thinker cache with room for the remaining text steps, thinker attention mask [B, width])."""
    caches = [state.thinker_cache for state in states]
    ends = [cache.length for cache in caches]
    filled = max(ends)
    total = filled + thinker_steps_needed(frames_left, frames_per_text)
    thinker_cache = type(caches[0])(
        align_layers([c.keys for c in caches], ends, total, filled),
        align_layers([c.values for c in caches], ends, total, filled),
        align_slots([c.valid for c in caches], ends, total, filled), filled,
    )
    masks = [state.thinker_mask for state in states]
    width = max(m.shape[1] for m in masks)
    return thinker_cache, align_slots(masks, [m.shape[1] for m in masks], width, width)


def merge_forced_text(states, im_end_token_id):
    """-> (texts to speak [B, N], which rows speak them [B]), every text padded with <|im_end|> to one width; or
    (None, None) when no state speaks a given text."""
    if all(state.forced_text is None for state in states):
        return None, None
    width = max(state.forced_text.shape[1] for state in states if state.forced_text is not None)
    texts, rows = [], []
    for state in states:
        batch = state.finished.shape[0]
        text = state.forced_text if state.forced_text is not None else state.last_text_id.new_zeros(batch, 0)
        texts.append(torch.nn.functional.pad(text, (0, width - text.shape[1]), value=im_end_token_id))
        rows.append(state.forced_rows if state.forced_rows is not None
                    else torch.full((batch,), state.forced_text is not None, device=text.device))
    return torch.cat(texts), torch.cat(rows)


__all__ = ["merge_states", "select_rows"]
