# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Reusable reference voices: `ChromaVoice` (a transcript and its Mimi codes, encoded once), its backbone prompt
prefix and the prefix's cached keys/values, and saving/loading as safetensors.

Shapes: P transcript ids, F frames, K codebooks, D backbone width.
"""

import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from .cache_chroma import ChromaKVCache


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
        config, device = model.config, model.backbone_device_dtype()[0]
        markers = model.embed_text(torch.tensor([config.text_start_token_id, config.text_end_token_id], device=device))
        return torch.cat([
            markers[:1], model.embed_text(self.text_ids.to(device)), markers[1:],
            model.embed_frames(self.codes.to(device)),
            markers.new_zeros(1, markers.shape[-1]),  # end of the reference audio
        ])

    def prefix_kv(self, model):
        """Per backbone layer (key, value) [H_kv, L, head_dim] of the prefix; computed once per model, device, dtype
        and version of the weights it depends on (an optimizer step or `load_state_dict` invalidates it)."""
        device, dtype = model.backbone_device_dtype()
        key = (id(model), str(device), dtype)
        version = prefix_weights_version(model)
        cached = self._prefix_kv.get(key)
        if cached is not None and cached[0]() is model and version is not None and cached[1] == version:
            return cached[2]
        embeds = self.prefix_embeddings(model)[None]
        cache = ChromaKVCache(model.config.backbone_config, 1, embeds.shape[1], device, dtype)
        with torch.no_grad():
            model.backbone(embeds, torch.arange(embeds.shape[1], device=device)[None], None, cache, 0)
        kv = [(k[0], v[0]) for k, v in zip(cache.keys, cache.values)]
        self._prefix_kv[key] = (weakref.ref(model), version, kv)
        return kv

    @classmethod
    def coerce(cls, voice) -> Optional["ChromaVoice"]:
        """`voice` as this module's `ChromaVoice`, or None if it is not a voice. A voice made by another copy of this
        file (the installed package vs a model loaded with trust_remote_code: two classes of the same name) is
        accepted and shares its prefix cache with the original."""
        if isinstance(voice, cls):
            return voice
        if type(voice).__name__ != cls.__name__ or not all(
                isinstance(getattr(voice, name, None), torch.Tensor) for name in ("text_ids", "codes")):
            return None
        return cls(text_ids=voice.text_ids, codes=voice.codes, transcript=getattr(voice, "transcript", None),
                   _prefix_kv=getattr(voice, "_prefix_kv", {}))

    def save(self, path):
        """Write the voice as safetensors (codes, transcript ids, transcript text in the metadata)."""
        from safetensors.torch import save_file

        metadata = {"format": "chroma-voice-v1", "transcript": self.transcript or ""}
        save_file({"text_ids": self.text_ids.cpu().contiguous(), "codes": self.codes.cpu().contiguous()},
                  str(path), metadata=metadata)

    @classmethod
    def load(cls, path) -> "ChromaVoice":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != "chroma-voice-v1":
                    raise ValueError(f"{path} is not a Chroma voice file (format {metadata.get('format')!r})")
                return cls(text_ids=f.get_tensor("text_ids"), codes=f.get_tensor("codes"),
                           transcript=metadata.get("transcript") or None)
        except SafetensorError as error:
            raise ValueError(f"{path} is not a Chroma voice file: {error}") from None


def prefix_weights_version(model):
    """A fingerprint of the weights a voice prefix's keys/values depend on (text and audio tables, backbone layers):
    every in-place change of a tensor bumps its version counter. None when unknown (inference-mode tensors)."""
    tensors = [model.get_input_embeddings().weight, model.backbone.audio_embedding.embed_audio_tokens.weight,
               *model.backbone.model.parameters()]
    try:
        return tuple((id(t), t._version) for t in tensors)
    except RuntimeError:  # tensors created under torch.inference_mode() have no version counter
        return None


__all__ = ["ChromaVoice", "prefix_weights_version"]
