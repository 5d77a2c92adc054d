# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Chroma 1.0: an end-to-end spoken-dialogue model with voice cloning (FlashLabs/Chroma-4B).

Data flow of one answer (shapes: B batch, S thinker tokens, L backbone positions, K codebooks, V audio vocabulary
(2048 Mimi codes + 3 specials = 2051), D backbone width = thinker width, Dd depth-decoder width)::

    conversation (text + user audio)          reference voice (transcript ids + 24 kHz wave)
            |                                              |
       thinker (Qwen2.5-Omni) ---- text ids --->           Mimi.encode -> codes [B, K, F]
            | post-norm hidden h [B, D]                    |
            |        token embedding E_t(id) [B, D]         |
            v                                              v
    backbone prompt = [E_t(text_start), E_t(transcript)..., E_t(text_end), frame_emb(ref frames)..., 0, h, E_t(id)]
            |
    per frame: backbone (Llama, D) -> codebook0_head -> c0
               depth decoder (Llama, Dd): [h_bb, A(c0)] -> c1 ... A(c6) -> c7          (7 steps, fresh cache)
               next backbone input = frame_emb(c0..c7); every 2nd frame also [h, E_t(id)] of one more thinker step
            |
    codes [B, T, K] --> Mimi.decode --> 24 kHz audio

``frame_emb(codes) = sum_k A[k * V + codes[k]]`` with A the audio table shared by the backbone and the depth decoder.
The generation loop (schedule, caches, stopping) lives in ``generation_chroma.py``; this file holds the modules, the
checkpoint layout and the teacher-forced training forward.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MimiModel, PreTrainedModel, Qwen2_5OmniThinkerForConditionalGeneration
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput, logging

from .cache_chroma import padding_causal_mask
from .codec_chroma import MimiStreamingDecoder
from .configuration_chroma import ChromaBackboneConfig, ChromaConfig, ChromaDecoderConfig
from .generation_chroma import ChromaGenerationMixin

# Loading a local folder as remote code, transformers 5.0 copies only the hub files this file imports itself (5.2x
# follows imports of imports): every other hub file the model runs on is named here.
from .batching_chroma import merge_states, select_rows  # noqa: F401
from .sampling_chroma import SamplingParams  # noqa: F401
from .state_chroma import ChromaGenerateOutput  # noqa: F401
from .voice_chroma import ChromaVoice  # noqa: F401


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Llama-3 building blocks (backbone and depth decoder). Own code rather than transformers' LlamaModel so that the
# KV cache is a plain preallocated tensor pair indexed by slot, and RoPE positions are explicit per row: this is
# what makes batched rows behave exactly like solo runs and what a compiled one-frame step needs.
# ----------------------------------------------------------------------------------------------------------------------


def rope_inverse_frequencies(rope: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] for 'default' or 'llama3' RoPE (Llama 3.1 frequency-dependent scaling)."""
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope["rope_type"] == "default":
        return inv_freq
    factor = rope["factor"]
    low_freq_factor, high_freq_factor = rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated smoothly
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class ChromaRotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.rope_parameters = dict(config.rope_parameters)
        self.head_dim = config.head_dim
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self):
        return rope_inverse_frequencies(self.rope_parameters, self.head_dim)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids [B, L] -> (cos, sin) each [B, L, head_dim], computed in float32."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


# Float32 matrix products with a handful of rows (decode steps: 1-3 positions per row, a few rows) are memory-bound:
# the cost should be one read of the weight. On the CPU, `F.linear` (x @ W^T) with 2..64 rows goes through a GEMM
# that repacks W first and costs 2-3x a single-row product; `W @ x^T` streams W once (benchmarks/RESULTS.md has the
# measurements). bfloat16 is the other way round, and CUDA's kernels do not care, so only float32 CPU takes it.
FEW_ROWS_MAX = 64


def is_plain_weight(weight: torch.Tensor) -> bool:
    """False for quantized weights: torchao and bitsandbytes store them as tensor subclasses that only implement
    `F.linear` (their own kernels), not `torch.mm`."""
    return type(weight) in (torch.Tensor, nn.Parameter)


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [..., in]; as (W @ x^T)^T when x holds 2..FEW_ROWS_MAX float32 rows on the
    CPU and the weight is a plain tensor (same result up to float rounding)."""
    rows = x.shape[:-1].numel()
    if not (1 < rows <= FEW_ROWS_MAX and x.is_cpu and x.dtype == torch.float32 and is_plain_weight(weight)):
        return F.linear(x, weight, bias)
    columns = x.reshape(rows, x.shape[-1]).t()  # [in, rows], a view
    out = torch.mm(weight, columns) if bias is None else torch.addmm(bias[:, None], weight, columns)
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def apply_linear(x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    """`module(x)` for an `nn.Linear`, through `few_rows_linear`; a quantized one (bitsandbytes replaces the module,
    torchao its weight) through its own forward.

    The backbone, depth decoder and thinker decode step keep plain `nn.Linear` modules and call them through this
    function: quantizers only convert modules whose type is exactly `nn.Linear` (transformers >= 5.2x, bitsandbytes).
    """
    if type(module) is not nn.Linear or not is_plain_weight(module.weight):  # also a peft LoRA wrapper
        return module(x)
    return few_rows_linear(x, module.weight, module.bias)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ChromaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        # normalise in float32, scale in the input dtype (as Llama does)
        normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon)
        return self.weight * normed.to(hidden_states.dtype)


class ChromaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        gated = self.act_fn(apply_linear(x, self.gate_proj)) * apply_linear(x, self.up_proj)
        return apply_linear(gated, self.down_proj)


class ChromaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.attention_dropout = config.attention_dropout

    def forward(self, hidden_states, cos, sin, attention_mask, cache=None, cache_start=0):
        """hidden_states [B, L, D]; cos/sin [B, 1, L, hd]; attention_mask [B, 1, L, L_kv] bool (True = attend), or
        None for causal attention over the L inputs alone (or, with L = 1, over the whole cache)."""
        bsz, length, _ = hidden_states.shape
        q = apply_linear(hidden_states, self.q_proj).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = apply_linear(hidden_states, self.k_proj).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = apply_linear(hidden_states, self.v_proj).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        qk = torch.cat([q, k], dim=1)  # RoPE on queries and keys in one go: [B, H + H_kv, L, hd]
        q, k = (qk * cos + rotate_half(qk) * sin).split([self.num_heads, self.num_kv_heads], dim=1)
        if cache is not None:
            k, v = cache.write(self.layer_idx, cache_start, k, v)
        if attention_mask is None and length not in (1, k.shape[2]):
            raise ValueError("several new positions after cached ones need an explicit attention_mask")
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attention_mask,
            # without a mask: causal over L new positions, or one query that sees the whole cache
            is_causal=attention_mask is None and length > 1,
            dropout_p=self.attention_dropout if self.training else 0.0,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return apply_linear(out.transpose(1, 2).reshape(bsz, length, -1), self.o_proj)


class ChromaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = ChromaAttention(config, layer_idx)
        self.mlp = ChromaMLP(config)
        self.input_layernorm = ChromaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ChromaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, cos, sin, attention_mask, cache=None, cache_start=0):
        # Self Attention
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = residual + self.self_attn(hidden_states, cos, sin, attention_mask, cache, cache_start)
        # Fully Connected
        residual = hidden_states
        hidden_states = residual + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class ChromaTransformer(nn.Module):
    """A Llama-3 stack over input embeddings (no token-embedding table). Returns the post-final-norm hidden states."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([ChromaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = ChromaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ChromaRotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds, position_ids, attention_mask=None, cache=None, cache_start=0, rope=None):
        """inputs_embeds [B, L, D], position_ids [B, L] -> hidden [B, L, D].

        attention_mask: [B, 1, L, L_kv] bool or None (causal over the L inputs; only valid without padding).
        cache: a `ChromaKVCache`; the L inputs are written at slots cache_start..cache_start+L.
        rope: optional (cos, sin) already computed for position_ids by `rotary_emb` (saves work in hot loops).
        """
        cos, sin = rope if rope is not None else self.rotary_emb(position_ids, inputs_embeds.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, L, hd]: broadcast over heads
        hidden_states = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, cos, sin, attention_mask, cache, cache_start, use_reentrant=False
                )
            else:
                hidden_states = layer(hidden_states, cos, sin, attention_mask, cache, cache_start)
        return self.norm(hidden_states)


class ChromaAudioEmbedding(nn.Module):
    """The audio table A [K * V, D]: codebook k's code c is row k * V + c. A frame is embedded as the sum of its rows."""

    def __init__(self, num_codebooks, vocab_size, embedding_dim):
        super().__init__()
        self.num_codebooks = num_codebooks
        self.vocab_size = vocab_size
        self.embed_audio_tokens = nn.Embedding(num_codebooks * vocab_size, embedding_dim)
        self.register_buffer("codebook_offsets", torch.arange(num_codebooks) * vocab_size, persistent=False)

    def forward(self, codes: torch.Tensor, codebook_index: Optional[int] = None) -> torch.Tensor:
        """codes [..., k<=K] -> per-codebook embeddings [..., k, D] (codebook_index None), or codes [...] of one codebook
        -> [..., D]. The ignore label -100 is embedded as code 0, as the official code does."""
        codes = codes.clamp(min=0)
        if codebook_index is None:  # the last axis holds codebooks 0, 1, ... (a prefix of the K is allowed)
            return self.embed_audio_tokens(codes + self.codebook_offsets[: codes.shape[-1]])
        return self.embed_audio_tokens(codes + codebook_index * self.vocab_size)

    def embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., K] -> summed frame embedding [..., D]."""
        return self(codes).sum(dim=-2)


class ChromaBackboneForCausalLM(nn.Module):
    """Backbone: Llama stack over [B, L, D] inputs; `codebook0_head` maps its post-norm state to codebook-0 logits."""

    def __init__(self, config: ChromaBackboneConfig):
        super().__init__()
        self.config = config
        self.model = ChromaTransformer(config)
        self.codebook0_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.audio_embedding = ChromaAudioEmbedding(config.audio_num_codebooks, config.vocab_size, config.hidden_size)

    def forward(self, inputs_embeds, position_ids, attention_mask=None, cache=None, cache_start=0, logits_to_keep=0):
        """-> (hidden [B, L, D], codebook-0 logits [B, L', V]) with L' = L, or the last `logits_to_keep` positions."""
        hidden = self.model(inputs_embeds, position_ids, attention_mask, cache, cache_start)
        return hidden, apply_linear(hidden[:, -logits_to_keep:] if logits_to_keep else hidden, self.codebook0_head)


class ChromaCodebookHeads(nn.Module):
    """One [Dd, V] output matrix per codebook 1..K-1, stored as `weight` [K-1, Dd, V] (in x out, used as h @ W)."""

    def __init__(self, num_heads, hidden_size, vocab_size):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, hidden_size, vocab_size))


class ChromaDecoderForCausalLM(nn.Module):
    """Depth decoder. Position 0 holds the backbone state, position k (1..K-1) the embedding of code c_{k-1}; the
    post-norm state at position k gives codebook k's logits through `codebook_head.weight[k - 1]` ([Dd, V], used as
    `h @ W`, the published orientation)."""

    def __init__(self, config: ChromaDecoderConfig):
        super().__init__()
        self.config = config
        self.projection = nn.Linear(config.audio_embedding_dim, config.hidden_size, bias=False)
        self.model = ChromaTransformer(config)
        self.codebook_head = ChromaCodebookHeads(config.audio_num_codebooks - 1, config.hidden_size, config.vocab_size)
        self.audio_embedding = ChromaAudioEmbedding(
            config.audio_num_codebooks, config.vocab_size, config.audio_embedding_dim
        )

    def forward(self, inputs_embeds, position_ids, attention_mask=None, cache=None, cache_start=0, rope=None):
        """inputs_embeds [B, L, audio_embedding_dim] (unprojected) -> post-norm hidden [B, L, Dd]."""
        projected = apply_linear(inputs_embeds, self.projection)
        return self.model(projected, position_ids, attention_mask, cache, cache_start, rope)

    def codebook_logits(self, hidden, codebook_index):
        """hidden [..., Dd] at the position that predicts codebook `codebook_index` (1..K-1) -> logits [..., V]."""
        return hidden @ self.codebook_head.weight[codebook_index - 1]


# ----------------------------------------------------------------------------------------------------------------------
# The thinker's text decode step on a preallocated cache
# ----------------------------------------------------------------------------------------------------------------------


class ChromaThinkerCache:
    """Preallocated thinker keys/values [B, H_kv, capacity, head_dim] per layer plus the slot validity [B, capacity]."""

    def __init__(self, keys, values, valid, length):
        self.keys, self.values, self.valid, self.length = keys, values, valid, length


class ChromaThinkerDecoder:
    """One-token decode steps of the thinker's text model, reading the thinker's own weights.

    The prompt (with its audio features) still goes through the transformers thinker; its KV cache is then copied into
    preallocated buffers and every later text step runs here: a plain Qwen2 decoder layer (q/k/v with bias, RoPE,
    RMSNorm, SwiGLU) with explicit per-row positions. For Chroma's audio/text prompts the three M-RoPE sections share
    one position, which is ordinary RoPE. `tests/test_fast_path.py` checks it against the transformers forward.
    """

    def __init__(self, thinker):
        text_model = thinker.get_decoder()
        if not hasattr(text_model, "layers"):  # transformers 5.0: the thinker itself is returned
            text_model = thinker.model
        self.text_model = text_model
        self.lm_head = thinker.lm_head
        config = thinker.config.text_config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.inv_freq = text_model.rotary_emb.inv_freq
        self.attention_scaling = getattr(text_model.rotary_emb, "attention_scaling", 1.0)

    def init_cache(self, prefill_cache, attention_mask, capacity) -> ChromaThinkerCache:
        """Copy a transformers prefill cache (S positions, mask [B, S]) into buffers of `capacity` slots."""
        length = attention_mask.shape[1]
        keys, values = [], []
        for layer in prefill_cache.layers[: len(self.text_model.layers)]:
            k = layer.keys.new_zeros(layer.keys.shape[0], layer.keys.shape[1], capacity, layer.keys.shape[-1])
            v = torch.zeros_like(k)
            k[:, :, :length], v[:, :, :length] = layer.keys, layer.values
            keys.append(k)
            values.append(v)
        valid = torch.zeros(attention_mask.shape[0], capacity, dtype=torch.bool, device=attention_mask.device)
        valid[:, :length] = attention_mask.bool()
        return ChromaThinkerCache(keys, values, valid, length)

    def step(self, cache: ChromaThinkerCache, ids, positions, valid):
        """ids [B], positions [B], valid [B] (False: a padding slot for rows that stopped talking)
        -> post-norm hidden [B, D] and logits [B, V]."""
        slot = cache.length
        if slot >= cache.valid.shape[1]:
            raise ValueError("thinker cache overflow")
        cache.valid[:, slot] = valid
        cache.length = slot + 1
        x = self.text_model.embed_tokens(ids[:, None])  # [B, 1, D]
        freqs = positions[:, None, None].float() * self.inv_freq.float()  # [B, 1, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(x.dtype)[:, None]  # [B, 1, 1, hd]
        sin = (emb.sin() * self.attention_scaling).to(x.dtype)[:, None]
        # a padding query attends to itself only (finite, unused); real queries to their row's real slots
        mask = cache.valid[:, None, None, : slot + 1].clone()
        mask[..., slot] = True
        bsz = ids.shape[0]
        for i, layer in enumerate(self.text_model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = apply_linear(h, attn.q_proj).view(bsz, 1, self.num_heads, self.head_dim).transpose(1, 2)
            k = apply_linear(h, attn.k_proj).view(bsz, 1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = apply_linear(h, attn.v_proj).view(bsz, 1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            cache.keys[i][:, :, slot:slot + 1] = k
            cache.values[i][:, :, slot:slot + 1] = v
            groups = self.num_heads // self.num_kv_heads
            keys = cache.keys[i][:, :, : slot + 1].repeat_interleave(groups, dim=1)
            vals = cache.values[i][:, :, : slot + 1].repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=attn.scaling)
            x = x + apply_linear(out.transpose(1, 2).reshape(bsz, 1, -1), attn.o_proj)
            mlp, h = layer.mlp, layer.post_attention_layernorm(x)
            x = x + apply_linear(mlp.act_fn(apply_linear(h, mlp.gate_proj)) * apply_linear(h, mlp.up_proj), mlp.down_proj)
        hidden = self.text_model.norm(x)[:, 0]
        return hidden, apply_linear(hidden, self.lm_head)


# ----------------------------------------------------------------------------------------------------------------------
# The composite model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ChromaOutput(ModelOutput):
    """Output of the teacher-forced forward.

    loss: `(1 - w) * backbone_loss + w * depth_loss`, w = `config.decoder_loss_weight`.
    backbone_loss: codebook-0 cross-entropy, position t predicting the frame at t + 1.
    depth_loss: codebooks 1..K-1 cross-entropy on every `loss_stride`-th audio frame.
    logits: codebook-0 logits [B, L, V].
    depth_logits: [N, K-1, V] for the N frames the depth loss used.
    last_hidden_state: backbone post-norm hidden states [B, L, D].
    """

    loss: Optional[torch.FloatTensor] = None
    backbone_loss: Optional[torch.FloatTensor] = None
    depth_loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    depth_logits: Optional[torch.FloatTensor] = None
    last_hidden_state: Optional[torch.FloatTensor] = None


class ChromaPreTrainedModel(PreTrainedModel):
    config_class = ChromaConfig
    config: ChromaConfig
    base_model_prefix = "chroma"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChromaDecoderLayer", "Qwen2_5OmniDecoderLayer", "Qwen2_5OmniAudioEncoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers' `initialization` helpers skip tensors that were loaded from a checkpoint
        std = self.config.backbone_config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ChromaRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ChromaCodebookHeads):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ChromaRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, ChromaAudioEmbedding):
            init.copy_(module.codebook_offsets, torch.arange(module.num_codebooks) * module.vocab_size)


def _drop_vision_tower(thinker):
    """Chroma never runs the thinker's vision encoder (0.67 B parameters at full size): release it."""
    for owner in (thinker, getattr(thinker, "model", None)):
        if owner is not None and isinstance(getattr(owner, "visual", None), nn.Module):
            owner.visual = None
            return


class ChromaForConditionalGeneration(ChromaGenerationMixin, ChromaPreTrainedModel):
    """Chroma 1.0 with the published parameter names: `thinker`, `backbone`, `decoder`, `codec_model`.

    Use `generate()` (see `generation_chroma.py`) for answers; `forward()` is the teacher-forced training pass.
    """

    # save_pretrained writes an auto_map and copies the hub files, so the folder loads with trust_remote_code
    _auto_class = "AutoModelForCausalLM"
    _tied_weights_keys = {
        "backbone.audio_embedding.embed_audio_tokens.weight": "decoder.audio_embedding.embed_audio_tokens.weight"
    }
    # The published checkpoint stores the (unused) vision tower; it is skipped unless config.load_vision_tower.
    _keys_to_ignore_on_load_unexpected = [r"^thinker\.(model\.)?visual\."]
    # Mimi loads in float32 whatever `dtype=` says (transformers' keep-in-fp32 mechanism; quantizers skip it too),
    # unless config.codec_dtype == "model"
    _keep_in_fp32_modules_strict = ["codec_model"]

    def __init__(self, config: ChromaConfig):
        super().__init__(config)
        if config.codec_dtype == "model":
            self._keep_in_fp32_modules_strict = []
            self.dtype_plan = {}  # transformers 5.0 derives it from the class attribute in PreTrainedModel.__init__
        if config.backbone_config.hidden_size != config.thinker_config.text_config.hidden_size:
            raise ValueError(
                "backbone_config.hidden_size must equal the thinker's text hidden size (Chroma has no projection): "
                f"{config.backbone_config.hidden_size} != {config.thinker_config.text_config.hidden_size}"
            )
        if config.decoder_config.audio_embedding_dim != config.backbone_config.hidden_size:
            raise ValueError("decoder_config.audio_embedding_dim must equal backbone_config.hidden_size")
        self.thinker = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config)
        if not config.load_vision_tower:
            _drop_vision_tower(self.thinker)
        self.backbone = ChromaBackboneForCausalLM(config.backbone_config)
        self.decoder = ChromaDecoderForCausalLM(config.decoder_config)
        self.decoder.audio_embedding.embed_audio_tokens.weight = self.backbone.audio_embedding.embed_audio_tokens.weight
        self.codec_model = MimiModel(config.codec_config)
        self.post_init()

    def tie_weights(self, *args, **kwargs):
        """transformers' tying, then the audio table made one Parameter whichever of its two names a checkpoint
        stores: transformers 5.0 leaves the two copies the official `save_pretrained` writes untied."""
        super().tie_weights(*args, **kwargs)
        if self.config.tie_word_embeddings:
            self.share_audio_table()

    def share_audio_table(self):
        """Make the backbone's audio table the decoder's Parameter (both names stay in the state dict)."""
        (target, source), = self._tied_weights_keys.items()
        backbone, decoder = self.get_parameter(target), self.get_parameter(source)
        if backbone is decoder:
            return
        if not (backbone.is_meta or decoder.is_meta) and not torch.equal(backbone, decoder):
            raise ValueError(f"the checkpoint stores two different audio tables ({target} and {source}); Chroma's "
                             "backbone and depth decoder share one (set tie_word_embeddings=False to keep both)")
        self.backbone.audio_embedding.embed_audio_tokens.weight = decoder
        tied = getattr(self, "all_tied_weights_keys", None)
        if isinstance(tied, dict):  # so that save_pretrained writes the table once again
            tied[target] = source

    def get_input_embeddings(self):
        """The thinker's token table (it also embeds text for the backbone)."""
        return self.thinker.get_input_embeddings()

    def streaming_audio_decoder(self) -> MimiStreamingDecoder:
        """A Mimi decoder that carries its state between chunks (see codec_chroma.py)."""
        return MimiStreamingDecoder(self.codec_model)

    def thinker_decoder(self) -> ChromaThinkerDecoder:
        """The thinker's one-token decode step on a preallocated cache (used by generation after the prompt)."""
        return ChromaThinkerDecoder(self.thinker)

    # -- embeddings ----------------------------------------------------------------------------------------------------

    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Thinker-vocabulary ids [...] -> backbone inputs [..., D] (the thinker's own input table, no projection)."""
        return self.thinker.get_input_embeddings()(token_ids)

    def embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """Audio frames [..., K] -> summed embeddings [..., D]."""
        return self.backbone.audio_embedding.embed_frames(codes)

    @torch.no_grad()
    def encode_audio(self, input_values: torch.Tensor) -> torch.Tensor:
        """24 kHz waveform [B, 1, T] -> Mimi codes [B, F, K] (frame-major), F = ceil(T / audio_frame_freq)."""
        codes = self.codec_model.encode(input_values.to(self.codec_model.dtype)).audio_codes
        return codes[:, : self.config.audio_num_codebooks].transpose(1, 2)

    # -- training ------------------------------------------------------------------------------------------------------

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> ChromaOutput:
        """Teacher-forced pass over a prepared backbone sequence (generation uses `generate()`).

        inputs_embeds: [B, L, D] backbone inputs (the sequence generation would build; see `finetune_chroma`).
        labels: [B, L, >=K] the audio frame whose embedding sits at each position, -100 elsewhere (only the first K
            codebooks are used). Position t is trained to predict the frame at t + 1.
        attention_mask: [B, L] (1 = real, 0 = padding; right padding).
        position_ids: [B, L]; defaults to cumulative counts of real positions.
        """
        if kwargs:
            raise TypeError(f"forward() got unexpected arguments {sorted(kwargs)}; use generate() for inference")
        bsz, length, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(bsz, length, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = padding_causal_mask(attention_mask.bool(), length)
        hidden, logits = self.backbone(inputs_embeds, position_ids, mask)
        output = ChromaOutput(logits=logits, last_hidden_state=hidden)
        if labels is None:
            return output
        k = self.config.audio_num_codebooks
        labels = labels[..., :k]
        # shift: position t predicts the frame stored at t + 1
        shifted = torch.cat([labels[:, 1:], labels.new_full((bsz, 1, k), -100)], dim=1)
        backbone_loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), shifted[..., 0].reshape(-1), ignore_index=-100
        )
        # depth decoder on every loss_stride-th frame, backbone state detached
        selected = (shifted[..., 0] != -100).reshape(-1).nonzero().squeeze(-1)[:: self.config.loss_stride]
        frames = shifted.reshape(-1, k)[selected]  # [N, K]
        states = hidden.detach().reshape(-1, hidden.shape[-1])[selected]  # [N, D]
        depth_logits = self.depth_teacher_forced(states, frames)  # [N, K-1, V]
        depth_loss = F.cross_entropy(
            depth_logits.float().reshape(-1, depth_logits.shape[-1]), frames[:, 1:].reshape(-1), ignore_index=-100
        )
        w = self.config.decoder_loss_weight
        output.loss = (1 - w) * backbone_loss + w * depth_loss
        output.backbone_loss, output.depth_loss, output.depth_logits = backbone_loss, depth_loss, depth_logits
        return output

    def depth_teacher_forced(self, backbone_states: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """backbone_states [N, D], frames [N, K] -> logits for codebooks 1..K-1 [N, K-1, V].

        Inputs [h, A(c0), ..., A(c_{K-2})] at positions 0..K-1 (the official training layout).
        """
        k = self.config.audio_num_codebooks
        code_embeds = self.decoder.audio_embedding(frames[:, : k - 1])  # [N, K-1, D]
        inputs = torch.cat([backbone_states[:, None], code_embeds], dim=1)  # [N, K, D]
        positions = torch.arange(k, device=inputs.device).expand(inputs.shape[0], k)
        hidden = self.decoder(inputs, positions)  # [N, K, Dd]
        return torch.einsum("nkd,kdv->nkv", hidden[:, 1:], self.decoder.codebook_head.weight)


__all__ = ["ChromaForConditionalGeneration", "ChromaPreTrainedModel", "ChromaOutput"]
