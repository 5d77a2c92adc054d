# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""The per-request side of Chroma generation: `ChromaGenerationState` (everything one batch of answers carries from
step to step), the `ChromaChunk`s `stream()` yields and the `ChromaGenerateOutput` `generate()` returns.

Where the rest lives: caches, masks and the text/audio schedule in `cache_chroma.py`, sampling in
`sampling_chroma.py`, voices in `voice_chroma.py`, changing the rows of a running batch in `batching_chroma.py`,
the loop in `generation_chroma.py`.

Shapes: B batch, K codebooks, V audio vocabulary, D backbone width, S thinker tokens.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from transformers.utils import ModelOutput

from .cache_chroma import ChromaKVCache


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
    audio: per row, the decoded float32 24 kHz waveform [audio_lengths[b] * audio_frame_freq] (with
        `output_audio=True`).
    """

    sequences: Optional[torch.LongTensor] = None
    audio_lengths: Optional[torch.LongTensor] = None
    text_sequences: Optional[torch.LongTensor] = None
    text_lengths: Optional[torch.LongTensor] = None
    finish_reasons: Optional[list] = None
    logits: Optional[tuple] = None
    depth_logits: Optional[tuple] = None
    audio: Optional[list] = None


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


__all__ = ["ChromaChunk", "ChromaGenerateOutput", "ChromaGenerationState", "collect_output"]
