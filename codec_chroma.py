# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Streaming Mimi decoding with carried state: codes chunk by chunk -> PCM, equal to one-shot decoding.

transformers' `MimiModel.decode` keeps no convolution state between calls (only the decoder transformer can keep a KV
cache), so decoding frame by frame with it is *not* decoding all frames at once: every call restarts the causal
convolutions from zero padding and drops the overlap of the transposed convolutions. `MimiStreamingDecoder` runs the
same modules and weights of an existing `MimiModel`, moshi-style, with an explicit per-stream state::

    codes [B, K, n]
      -> quantizer.decode          stateless                    -> latents [B, D, n]
      -> upsample (ConvTranspose)  overlap tail [B, D, K-S]     -> [B, D, T],  T = n * upsample stride
      -> decoder transformer       KV cache, positions [B]      -> [B, D, T]   (sliding window, RoPE)
      -> SEANet decoder            Conv1d: left context [B, C_in, (k-1)*dilation]; ConvTranspose1d: overlap
                                   tail [B, C_out, K-S]; ELU; ResnetBlock = shortcut + (ELU, Conv1d, ELU, Conv1d)
      -> pcm [B, n * frame_samples]

For every chunk schedule, `cat(decode_chunk(c) for c in chunks) == codec_model.decode(all_codes).audio_values`
up to float32 re-association (the same products are summed in another order: overlap-add split over two calls, a
shorter attention row, convolution kernels picked per input length); tests/test_codec_streaming.py measures it.

Padding rules reproduced (transformers `MimiConv1d` / `MimiConvTranspose1d`):
    * causal `MimiConv1d`, stride 1: left padding `padding_total = (k-1)*dilation + 1 - stride` with `pad_mode`
      ("constant": zeros, "replicate": the stream's first sample), extra right padding 0 (it is only non-zero for
      stride > 1, which the decoder never uses). Streaming: keep the last `padding_total` inputs as left context.
    * causal `MimiConvTranspose1d`, `trim_right_ratio = 1`: the full output of L inputs has (L-1)*S + K samples and
      the last K - S are trimmed, so the output is exactly L*S samples and sample i only needs inputs <= i // S.
      Streaming: add the previous chunk's pending K - S samples to the start of this chunk's (bias-free) output,
      emit n*S samples plus bias, keep the last K - S as the new pending tail.
    * decoder transformer: position p attends to positions p - W + 1 .. p (W = `sliding_window`), RoPE at absolute
      positions; the cache keeps the last W - 1 keys/values of each row and their positions.

Sliding window and transformers versions: transformers 5.0.0's one-shot `decode` ignores `config.sliding_window`
(its causal mask attends to the whole past), later releases (5.23 checked) and moshi apply it. The streaming decoder
follows the config by default; pass `sliding_window=None` to reproduce 5.0's one-shot output beyond the window
(`sliding_window` counts transformer steps: 250 steps = 125 codec frames = 10 s for the published Mimi).

Shapes: B streams (batch rows), K codebooks, n frames in a chunk, D Mimi hidden size, T transformer steps.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock
from transformers.utils import logging


logger = logging.get_logger(__name__)


@dataclass
class MimiStreamState:
    """Everything one batch of streams carries between `decode_chunk` calls (one row per stream).

    conv_context: causal Conv1d name -> its last inputs [B, C_in, (k-1)*dilation] (the next chunk's left padding).
    transposed_overlap: ConvTranspose1d name -> output samples still waiting for the next input [B, C_out, K - S],
        bias not yet added.
    keys, values: per decoder-transformer layer [B, H_kv, S_cache, head_dim] (keys with RoPE applied); S_cache is
        sliding_window - 1 (fixed), or grows without a window.
    key_positions: [B, S_cache] absolute transformer position of each cached entry, -1 for an empty slot.
    next_position: [B] transformer position of the row's next step (latent_stride steps per codec frame).
    started: [B] whether the row has decoded a chunk since init/reset ("replicate" padding copies its first sample).
    """

    conv_context: Dict[str, torch.Tensor]
    transposed_overlap: Dict[str, torch.Tensor]
    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    key_positions: torch.Tensor
    next_position: torch.Tensor
    started: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.next_position.shape[0]


# ----------------------------------------------------------------------------------------------------------------------
# Streaming building blocks: each wraps one transformers module, reads its weights and keeps its state in the state
# object under its own name.
# ----------------------------------------------------------------------------------------------------------------------


class StreamingConv1d:
    """A causal stride-1 `MimiConv1d` fed in pieces: its left padding is the previous inputs."""

    def __init__(self, name: str, module: MimiConv1d):
        if not module.causal:
            raise ValueError(f"{name}: a non-causal convolution (use_causal_conv=False) needs future inputs")
        if module.conv.stride[0] != 1:
            raise ValueError(f"{name}: stride {module.conv.stride[0]} convolutions are not used by the Mimi decoder")
        if module.pad_mode not in ("constant", "replicate"):
            raise ValueError(f"{name}: pad_mode={module.pad_mode!r} pads the start with future samples")
        self.name, self.module = name, module
        self.context = int(module.padding_total)  # (k - 1) * dilation

    def init_state(self, batch_size, device, dtype) -> torch.Tensor:
        return torch.zeros(batch_size, self.module.in_channels, self.context, device=device, dtype=dtype)

    def __call__(self, x: torch.Tensor, state: MimiStreamState) -> torch.Tensor:
        """x [B, C_in, T] -> [B, C_out, T]."""
        context = state.conv_context[self.name]  # [B, C_in, P]
        if self.module.pad_mode == "replicate":  # a new stream is left-padded with its first sample
            context = torch.where(state.started[:, None, None], context, x[..., :1].expand_as(context))
        padded = torch.cat([context, x], dim=-1)  # [B, C_in, P + T]
        state.conv_context[self.name] = padded[..., padded.shape[-1] - self.context :]
        return self.module.conv(padded)


class StreamingConvTranspose1d:
    """A causal `MimiConvTranspose1d` (trim_right_ratio = 1) fed in pieces: overlap-add across chunks."""

    def __init__(self, name: str, module: MimiConvTranspose1d):
        conv = module.conv
        if not module.causal or module.padding_left != 0:
            raise ValueError(
                f"{name}: only causal transposed convolutions with trim_right_ratio=1 stream (got causal="
                f"{module.causal}, trim_right_ratio={module.trim_right_ratio}); otherwise the one-shot output ends "
                "with samples that later frames would still change"
            )
        if conv.padding[0] != 0 or conv.output_padding[0] != 0 or conv.dilation[0] != 1:
            raise ValueError(f"{name}: unexpected ConvTranspose1d padding/output_padding/dilation")
        self.name, self.module = name, module
        self.stride = conv.stride[0]
        self.overlap = conv.kernel_size[0] - self.stride  # K - S: samples each chunk leaves to the next

    def init_state(self, batch_size, device, dtype) -> torch.Tensor:
        return torch.zeros(batch_size, self.module.conv.out_channels, self.overlap, device=device, dtype=dtype)

    def __call__(self, x: torch.Tensor, state: MimiStreamState) -> torch.Tensor:
        """x [B, C_in, T] -> [B, C_out, T * S]."""
        conv = self.module.conv
        # bias-free so that the overlapping samples get the bias once, when they are emitted
        full = F.conv_transpose1d(x, conv.weight, None, stride=self.stride, groups=conv.groups)  # [B, C_out, T*S + K-S]
        pending = state.transposed_overlap[self.name]  # [B, C_out, K - S]
        full = torch.cat([full[..., : self.overlap] + pending, full[..., self.overlap :]], dim=-1)
        emitted = x.shape[-1] * self.stride
        state.transposed_overlap[self.name] = full[..., emitted:]
        out = full[..., :emitted]
        return out if conv.bias is None else out + conv.bias[:, None]


class StreamingPointwise:
    """A module acting on each time step alone (ELU, Identity): no state."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module

    def __call__(self, x: torch.Tensor, state: MimiStreamState) -> torch.Tensor:
        return self.module(x)


class StreamingResnetBlock:
    """`MimiResnetBlock`: shortcut(x) + block(x), each part streamed."""

    def __init__(self, name: str, module: MimiResnetBlock):
        self.name = name
        self.block = streaming_layers(module.block, f"{name}.block")
        self.shortcut = streaming_layer(f"{name}.shortcut", module.shortcut)

    def __call__(self, x: torch.Tensor, state: MimiStreamState) -> torch.Tensor:
        hidden = x
        for layer in self.block:
            hidden = layer(hidden, state)
        return self.shortcut(x, state) + hidden


def streaming_layer(name: str, module: nn.Module):
    """The streaming counterpart of one SEANet decoder module."""
    if isinstance(module, MimiConv1d):
        return StreamingConv1d(name, module)
    if isinstance(module, MimiConvTranspose1d):
        return StreamingConvTranspose1d(name, module)
    if isinstance(module, MimiResnetBlock):
        return StreamingResnetBlock(name, module)
    if isinstance(module, (nn.ELU, nn.Identity)):
        return StreamingPointwise(name, module)
    raise TypeError(f"{name}: no streaming version of {type(module).__name__}")


def streaming_layers(modules: nn.ModuleList, prefix: str) -> list:
    return [streaming_layer(f"{prefix}.{i}", module) for i, module in enumerate(modules)]


def iter_convs(layers):
    """Every StreamingConv1d / StreamingConvTranspose1d in `layers`, depth first."""
    for layer in layers:
        if isinstance(layer, (StreamingConv1d, StreamingConvTranspose1d)):
            yield layer
        elif isinstance(layer, StreamingResnetBlock):
            yield from iter_convs([*layer.block, layer.shortcut])


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class StreamingMimiTransformer:
    """The Mimi decoder transformer one chunk at a time, with a sliding-window KV cache carried in the state.

    Runs the layers' own submodules (layer norms, projections, MLP, layer scales, rotary embedding); only the attention
    product is ours, over [cached keys, new keys] with a mask built from absolute positions.
    """

    def __init__(self, transformer: nn.Module, sliding_window: Optional[int]):
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.layers = list(transformer.layers)
        # transformers >= 5.x: one rotary module on the model; 5.0: one per attention layer (all identical)
        self.rotary_emb = getattr(transformer, "rotary_emb", None) or self.layers[0].self_attn.rotary_emb
        self.sliding_window = sliding_window
        attn = self.layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim

    @property
    def cache_size(self) -> int:
        """Initial number of cache slots: the W - 1 past steps a window can see (0, growing, without a window)."""
        return 0 if self.sliding_window is None else self.sliding_window - 1

    def init_state(self, batch_size, device, dtype):
        shape = (batch_size, self.num_kv_heads, self.cache_size, self.head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        key_positions = torch.full((batch_size, self.cache_size), -1, device=device, dtype=torch.long)
        return keys, values, key_positions

    def attention_mask(self, key_positions: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """key_positions [B, S], query positions [B, T] -> allowed [B, 1, T, S]: causal, within the window, filled."""
        keys, queries = key_positions[:, None, :], positions[:, :, None]
        allowed = (keys >= 0) & (keys <= queries)
        if self.sliding_window is not None:
            allowed = allowed & (keys > queries - self.sliding_window)
        return allowed[:, None]

    def __call__(self, hidden: torch.Tensor, state: MimiStreamState) -> torch.Tensor:
        """hidden [B, T, D] -> [B, T, D]."""
        bsz, steps, _ = hidden.shape
        positions = state.next_position[:, None] + torch.arange(steps, device=hidden.device)  # [B, T]
        cos, sin = self.rotary_emb(hidden, positions)  # [B, T, head_dim] each
        cos, sin = cos[:, None], sin[:, None]
        key_positions = torch.cat([state.key_positions, positions], dim=1)  # [B, S + T]
        mask = self.attention_mask(key_positions, positions)  # [B, 1, T, S + T]
        keep = key_positions.shape[1] if self.sliding_window is None else self.sliding_window - 1

        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            # Self Attention
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(bsz, steps, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
            k = attn.k_proj(x).view(bsz, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, H_kv, T, Dh]
            v = attn.v_proj(x).view(bsz, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            keys = torch.cat([state.keys[i], k], dim=2)  # [B, H_kv, S + T, Dh]
            values = torch.cat([state.values[i], v], dim=2)
            groups = self.num_heads // self.num_kv_heads
            out = F.scaled_dot_product_attention(
                q,
                keys.repeat_interleave(groups, dim=1),
                values.repeat_interleave(groups, dim=1),
                attn_mask=mask,
                scale=attn.scaling,
            )  # [B, H, T, Dh]
            out = attn.o_proj(out.transpose(1, 2).reshape(bsz, steps, self.num_heads * self.head_dim))
            hidden = hidden + layer.self_attn_layer_scale(out)
            # Fully Connected
            hidden = hidden + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(hidden)))
            state.keys[i], state.values[i] = keys[:, :, keys.shape[2] - keep :], values[:, :, values.shape[2] - keep :]

        state.key_positions = key_positions[:, key_positions.shape[1] - keep :]
        state.next_position = state.next_position + steps
        return hidden


def mimi_decoder_parts(codec_model: nn.Module):
    """(upsample or None, decoder transformer, SEANet decoder) of a transformers `MimiModel`, in either layout:
    transformers 5.0 keeps them on the model (`upsample`, `decoder_transformer`, `decoder`); later releases nest
    them in `decoder` (a `MimiDecoderModel`: `upsample`, `decoder_transformer`, `decoder_seanet`)."""
    decoder = codec_model.decoder
    if decoder is None:
        raise ValueError("this MimiModel has no decoder (decoder_config=None)")
    if hasattr(decoder, "decoder_seanet"):
        return decoder.upsample, decoder.decoder_transformer, decoder.decoder_seanet
    return codec_model.upsample, codec_model.decoder_transformer, decoder


# ----------------------------------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------------------------------


class MimiStreamingDecoder:
    """Decode Mimi codes chunk by chunk with carried state; uses (never copies) the weights of `codec_model`.

    Example::

        decoder = MimiStreamingDecoder(model.codec_model)
        state = decoder.init_state(batch_size)
        for codes in chunks:                          # [B, K, n] each, any n >= 1
            pcm = decoder.decode_chunk(codes, state)  # [B, n * decoder.frame_samples]

    Args:
        codec_model: a transformers `MimiModel` (5.0 or later layout) with causal convolutions.
        sliding_window: transformer attention window in steps; "config" (default) takes
            `config.sliding_window` like Mimi itself, None attends to the whole past (transformers 5.0's one-shot).
    """

    def __init__(self, codec_model: nn.Module, sliding_window: Union[int, None, str] = "config"):
        upsample, transformer, seanet = mimi_decoder_parts(codec_model)
        if codec_model.config.audio_channels != 1:
            raise ValueError(f"only mono Mimi is supported, got audio_channels={codec_model.config.audio_channels}")
        if sliding_window == "config":
            sliding_window = getattr(transformer.config, "sliding_window", None)
        self.codec_model = codec_model
        self.upsample = StreamingConvTranspose1d("upsample", upsample) if upsample is not None else None
        self.transformer = StreamingMimiTransformer(transformer, sliding_window)
        self.seanet = streaming_layers(seanet.layers, "seanet.layers")
        self.convs = list(iter_convs(([self.upsample] if self.upsample is not None else []) + self.seanet))
        # samples per codec frame: the product of every transposed convolution's stride (upsample included)
        self.frame_samples = math.prod(c.stride for c in self.convs if isinstance(c, StreamingConvTranspose1d))
        logger.debug(
            "MimiStreamingDecoder: %d samples per frame, sliding window %s, %d stateful convolutions",
            self.frame_samples,
            sliding_window,
            len(self.convs),
        )

    def init_state(self, batch_size: int) -> MimiStreamState:
        """A fresh state for `batch_size` streams, on the codec's device and in its dtype."""
        param = next(self.codec_model.parameters())
        device, dtype = param.device, param.dtype
        keys, values, key_positions = self.transformer.init_state(batch_size, device, dtype)
        buffers = {c.name: c.init_state(batch_size, device, dtype) for c in self.convs}
        return MimiStreamState(
            conv_context={c.name: buffers[c.name] for c in self.convs if isinstance(c, StreamingConv1d)},
            transposed_overlap={c.name: buffers[c.name] for c in self.convs if isinstance(c, StreamingConvTranspose1d)},
            keys=keys,
            values=values,
            key_positions=key_positions,
            next_position=torch.zeros(batch_size, device=device, dtype=torch.long),
            started=torch.zeros(batch_size, device=device, dtype=torch.bool),
        )

    @torch.no_grad()
    def decode_chunk(self, codes: torch.Tensor, state: MimiStreamState) -> torch.Tensor:
        """codes [B, K, n] (the next n frames of each stream) -> pcm [B, n * frame_samples]; updates `state`."""
        bsz, _, frames = codes.shape
        if bsz != state.batch_size:
            raise ValueError(f"codes have {bsz} rows, the state {state.batch_size}")
        if frames == 0:
            return torch.zeros(bsz, 0, device=codes.device, dtype=next(self.codec_model.parameters()).dtype)
        hidden = self.codec_model.quantizer.decode(codes)  # [B, D, n]
        if self.upsample is not None:
            hidden = self.upsample(hidden, state)  # [B, D, n * latent_stride]
        hidden = self.transformer(hidden.transpose(1, 2), state).transpose(1, 2)  # [B, D, T]
        for layer in self.seanet:
            hidden = layer(hidden, state)  # ... -> [B, 1, n * frame_samples]
        state.started = torch.ones_like(state.started)
        return hidden[:, 0]

    def select_state(self, state: MimiStreamState, rows) -> MimiStreamState:
        """The streams of `rows` (row indices, in the new order) alone."""
        index = torch.as_tensor(rows, dtype=torch.long, device=state.next_position.device)
        return MimiStreamState(
            conv_context={name: t.index_select(0, index) for name, t in state.conv_context.items()},
            transposed_overlap={name: t.index_select(0, index) for name, t in state.transposed_overlap.items()},
            keys=[k.index_select(0, index) for k in state.keys],
            values=[v.index_select(0, index) for v in state.values],
            key_positions=state.key_positions.index_select(0, index), next_position=state.next_position[index],
            started=state.started[index],
        )

    def concat_states(self, states: List[MimiStreamState]) -> MimiStreamState:
        """One state holding the streams of `states` (in order). Without a sliding window the transformer caches
        differ in length: shorter ones get empty slots (position -1, never attended) in front."""
        slots = max(state.key_positions.shape[1] for state in states)

        def front_pad(tensor, dim, value=0):
            missing = slots - tensor.shape[dim]
            if not missing:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_full(shape, value), tensor], dim=dim)

        layers = range(len(states[0].keys))
        return MimiStreamState(
            conv_context={name: torch.cat([s.conv_context[name] for s in states]) for name in states[0].conv_context},
            transposed_overlap={name: torch.cat([s.transposed_overlap[name] for s in states])
                                for name in states[0].transposed_overlap},
            keys=[torch.cat([front_pad(s.keys[i], 2) for s in states]) for i in layers],
            values=[torch.cat([front_pad(s.values[i], 2) for s in states]) for i in layers],
            key_positions=torch.cat([front_pad(s.key_positions, 1, -1) for s in states]),
            next_position=torch.cat([s.next_position for s in states]),
            started=torch.cat([s.started for s in states]),
        )

    def reset(self, state: MimiStreamState, rows: torch.Tensor) -> None:
        """Restart the streams where `rows` [B] (bool) is True, as if freshly initialised; other rows are untouched."""
        rows = rows.to(device=state.next_position.device, dtype=torch.bool)
        for buffers in (state.conv_context, state.transposed_overlap):
            for name, tensor in buffers.items():
                buffers[name] = tensor.masked_fill(rows[:, None, None], 0)
        # cached keys/values of reset rows stay in memory but are masked out by their -1 positions
        state.key_positions = state.key_positions.masked_fill(rows[:, None], -1)
        state.next_position = state.next_position.masked_fill(rows, 0)
        state.started = state.started.masked_fill(rows, False)


__all__ = ["MimiStreamState", "MimiStreamingDecoder"]
