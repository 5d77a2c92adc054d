# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""How Chroma chooses tokens: `SamplingParams` (greedy, or temperature / top-k / top-p) and the two samplers, one for a
batch that shares its settings and one for rows that each have their own (a server's mixed batch).

Shapes: B or R rows, V vocabulary.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch


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


__all__ = ["SamplingParams", "sample_next_token", "sample_rows"]
