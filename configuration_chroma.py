# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Configuration of Chroma 1.0 (FlashLabs/Chroma-4B).

Chroma is four models in one checkpoint::

    thinker      Qwen2.5-Omni thinker      reads the conversation, writes text (greedy)
    backbone     Llama-3 (16 x 2048)       per 80 ms frame: predicts Mimi codebook 0
    decoder      Llama-3 (4 x 1024)        "depth decoder": codebooks 1..K-1 of the same frame
    codec_model  Mimi                      K codes per frame  <->  24 kHz audio

`ChromaConfig` nests one sub-config per part, under the field names the published ``config.json`` uses
(``thinker_config``, ``backbone_config``, ``decoder_config``, ``codec_config``). Every special token id used by
the model lives here with the real checkpoint's value as default; nothing else in the package hard-codes an id or
a size.

This file imports nothing but ``transformers`` (it is one of the hub files served as remote code).
"""

from transformers import MimiConfig, PretrainedConfig
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

from .pipeline_chroma import custom_pipelines


# RoPE used by the published backbone and depth decoder (llama3 frequency scaling). These were explicit defaults in
# the official code before transformers 5; a config.json that carries its own RoPE fields always wins.
BACKBONE_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 0.125,
    "high_freq_factor": 0.5,
    "original_max_position_embeddings": 1024,
}
DECODER_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1 / 512,
    "high_freq_factor": 1 / 128,
    "original_max_position_embeddings": 16,
}


def _resolve_rope(rope_parameters, rope_scaling, rope_theta, default):
    """One RoPE dict from any spelling a config.json may use.

    transformers 4.x wrote ``rope_scaling`` (+ a top-level ``rope_theta``); transformers 5 writes
    ``rope_parameters`` (theta inside). Either is honoured; with neither, the published default applies.
    """
    if rope_parameters is not None:
        rope = dict(rope_parameters)
    elif rope_scaling is not None:
        rope = dict(rope_scaling)
    else:
        rope = dict(default)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    if rope_theta is not None and "rope_theta" not in rope:
        rope["rope_theta"] = float(rope_theta)
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", default["rope_theta"])
    if rope["rope_type"] not in ("default", "llama3"):
        raise ValueError(f"Unsupported rope_type {rope['rope_type']!r}: Chroma uses 'llama3' (or 'default').")
    return rope


class _ChromaLlamaConfig(PretrainedConfig):
    """Fields shared by the backbone and the depth decoder (both are Llama-3 stacks without token embeddings)."""

    _default_rope = BACKBONE_ROPE

    def __init__(
        self,
        audio_num_codebooks=8,
        vocab_size=2051,
        max_position_embeddings=2048,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=None,
        hidden_act="silu",
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        rope_parameters=None,
        rope_scaling=None,
        rope_theta=None,
        **kwargs,
    ):
        self.audio_num_codebooks = audio_num_codebooks
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.rope_parameters = _resolve_rope(rope_parameters, rope_scaling, rope_theta, self._default_rope)
        super().__init__(**kwargs)


class ChromaBackboneConfig(_ChromaLlamaConfig):
    r"""Backbone: a Llama-3 stack reading summed audio-frame embeddings and thinker vectors, predicting codebook 0.

    Args:
        audio_num_codebooks (`int`, defaults to 8): Mimi codebooks per frame (K).
        vocab_size (`int`, defaults to 2051): codebook-0 head outputs (2048 Mimi codes + 3 special values).
        hidden_size (`int`, defaults to 2048): width D; must equal the thinker's text hidden size (no projection).
        rope_parameters (`dict`): llama3 RoPE; ``rope_scaling`` + ``rope_theta`` (transformers 4 spelling) also read.
        Other fields are the usual Llama ones.
    """

    model_type = "chroma_backbone"
    base_config_key = "backbone_config"
    _default_rope = BACKBONE_ROPE

    def __init__(self, **kwargs):
        # An own __init__ keeps transformers >= 5.2x from replacing it with a generated dataclass one.
        super().__init__(**kwargs)


class ChromaDecoderConfig(_ChromaLlamaConfig):
    r"""Depth decoder: a small Llama-3 stack predicting codebooks 1..K-1 of a frame from the backbone state.

    Args:
        audio_embedding_dim (`int`, defaults to 2048): width of the shared audio-embedding table (= backbone width);
            inputs are projected from it to ``hidden_size``.
        Other fields as in [`ChromaBackboneConfig`], with the published depth-decoder defaults.
    """

    model_type = "chroma_decoder"
    base_config_key = "decoder_config"
    _default_rope = DECODER_ROPE

    def __init__(
        self,
        audio_embedding_dim=2048,
        max_position_embeddings=33,
        hidden_size=1024,
        intermediate_size=8192,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        **kwargs,
    ):
        self.audio_embedding_dim = audio_embedding_dim
        super().__init__(
            max_position_embeddings=max_position_embeddings,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            **kwargs,
        )


def _sub_config(value, cls, **defaults):
    if value is None:
        return cls(**defaults)
    if isinstance(value, dict):
        value = dict(value)
        value.pop("model_type", None)
        return cls(**value)
    return value


class ChromaConfig(PretrainedConfig):
    r"""Configuration of [`ChromaForConditionalGeneration`].

    Args:
        thinker_config (`dict` or `Qwen2_5OmniThinkerConfig`, *optional*): the Qwen2.5-Omni thinker.
        backbone_config (`dict` or [`ChromaBackboneConfig`], *optional*): the codebook-0 backbone.
        decoder_config (`dict` or [`ChromaDecoderConfig`], *optional*): the depth decoder.
        codec_config (`dict` or `MimiConfig`, *optional*): Mimi, with ``num_quantizers = audio_num_codebooks``.
        audio_num_codebooks (`int`, defaults to 8): codebooks per frame (K); sub-configs must agree.
        codebook_pad_token_id (`int`, defaults to 2050): padding value of the audio vocabulary.
        codebook_eos_token_id (`int`, defaults to 0): a frame whose codebooks 0..K-2 all equal this ends the answer.
        text_start_token_id (`int`, defaults to 151665): thinker-vocabulary id opening the reference transcript.
        text_end_token_id (`int`, defaults to 151666): thinker-vocabulary id closing the reference transcript.
        im_end_token_id (`int`, defaults to 151645): ``<|im_end|>``; the thinker stops after emitting it.
        audio_frame_freq (`int`, defaults to 1920): 24 kHz samples per Mimi frame (80 ms).
        audio_frames_per_text_token (`int`, defaults to 2): the text/audio schedule (1 text token : 2 frames).
        load_vision_tower (`bool`, defaults to `False`): Chroma never uses the thinker's vision encoder; it is not
            allocated and its checkpoint tensors are skipped unless this is set.
        loss_stride (`int`, defaults to 16): training: the depth-decoder loss uses every loss_stride-th audio frame.
        decoder_loss_weight (`float`, defaults to 0.5): training: loss = (1 - w) * backbone + w * depth decoder.
        tie_word_embeddings (`bool`, defaults to `True`): the backbone and depth decoder share one audio table.
        codec_dtype (`str`, defaults to `"float32"`): Mimi's weights and computation. `"float32"` keeps them in float32
            whatever `dtype=` `from_pretrained` gets (80 M parameters; in bfloat16 a voice's codes change); `"model"`
            loads Mimi in the model's dtype like every other part.

    A small random model for tests and demos: [`ChromaConfig.tiny`].
    """

    model_type = "chroma"
    _auto_class = "AutoConfig"  # save_pretrained writes the auto_map entry
    sub_configs = {
        "thinker_config": Qwen2_5OmniThinkerConfig,
        "backbone_config": ChromaBackboneConfig,
        "decoder_config": ChromaDecoderConfig,
        "codec_config": MimiConfig,
    }

    def __init__(
        self,
        thinker_config=None,
        backbone_config=None,
        decoder_config=None,
        codec_config=None,
        codebook_pad_token_id=2050,
        codebook_eos_token_id=0,
        audio_num_codebooks=8,
        text_start_token_id=151665,
        text_end_token_id=151666,
        im_end_token_id=151645,
        audio_frame_freq=1920,
        audio_frames_per_text_token=2,
        load_vision_tower=False,
        loss_stride=16,
        decoder_loss_weight=0.5,
        tie_word_embeddings=True,
        codec_dtype="float32",
        **kwargs,
    ):
        self.thinker_config = _sub_config(thinker_config, Qwen2_5OmniThinkerConfig)
        self.backbone_config = _sub_config(backbone_config, ChromaBackboneConfig)
        self.decoder_config = _sub_config(decoder_config, ChromaDecoderConfig)
        self.codec_config = _sub_config(
            codec_config, MimiConfig, num_quantizers=audio_num_codebooks, frame_rate=12.5
        )
        self.codebook_pad_token_id = codebook_pad_token_id
        self.codebook_eos_token_id = codebook_eos_token_id
        self.audio_num_codebooks = audio_num_codebooks
        self.text_start_token_id = text_start_token_id
        self.text_end_token_id = text_end_token_id
        self.im_end_token_id = im_end_token_id
        self.audio_frame_freq = audio_frame_freq
        self.audio_frames_per_text_token = audio_frames_per_text_token
        self.load_vision_tower = load_vision_tower
        self.loss_stride = loss_stride
        self.decoder_loss_weight = decoder_loss_weight
        for name in ("backbone_config", "decoder_config"):
            k = getattr(self, name).audio_num_codebooks
            if k != audio_num_codebooks:
                raise ValueError(f"{name}.audio_num_codebooks={k} differs from audio_num_codebooks={audio_num_codebooks}")
        if self.codec_config.num_quantizers < audio_num_codebooks:
            raise ValueError(
                f"codec_config.num_quantizers={self.codec_config.num_quantizers} < audio_num_codebooks={audio_num_codebooks}"
            )
        if audio_frames_per_text_token < 1:
            raise ValueError("audio_frames_per_text_token must be >= 1")
        if codec_dtype not in ("float32", "model"):
            raise ValueError(f"codec_dtype must be 'float32' or 'model', got {codec_dtype!r}")
        self.codec_dtype = codec_dtype
        # "tie" here means the audio table shared by backbone and depth decoder (the thinker has its own flag)
        # transformers.pipeline("text-to-speech" | "any-to-any", model=..., trust_remote_code=True) finds ours here
        kwargs.setdefault("custom_pipelines", custom_pipelines())
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def codebook_size(self) -> int:
        """Number of real Mimi codes per codebook (2048); audio-vocabulary values at or above it are special."""
        return self.codec_config.codebook_size

    @property
    def num_hidden_layers(self) -> int:
        return self.backbone_config.num_hidden_layers

    @property
    def sampling_rate(self) -> int:
        """Sampling rate of the generated audio and of reference voices (Mimi's, 24000 Hz)."""
        return self.codec_config.sampling_rate

    @classmethod
    def tiny(cls, **overrides) -> "ChromaConfig":
        """A small random-weight configuration (about 2 M parameters) for tests and demos.

        Sizes and special-token ids are those of the shared golden fixture ``tests/fixtures/reference_tiny``:
        thinker vocabulary 1100 with the Qwen special block moved to ids 1000..1023 (``real_id - 151643 + 1000``),
        hidden size 64, two layers everywhere, a 2-filter Mimi with 8 codebooks of 2048 codes. Any field can be
        overridden by keyword. A model built from it outputs noise.
        """
        special = {name: real - 151643 + 1000 for name, real in TINY_SPECIAL_TOKENS_REAL_IDS.items()}
        thinker = {
            "audio_config": {
                "d_model": 32, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "encoder_layers": 2,
                "num_hidden_layers": 2, "n_window": 100, "num_mel_bins": 128, "output_dim": 64,
                "max_source_positions": 1500,
            },
            "text_config": {
                "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
                "num_key_value_heads": 2, "vocab_size": 1100, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                "rope_parameters": {"mrope_section": [2, 3, 3], "rope_theta": 1000000.0, "rope_type": "default"},
                "tie_word_embeddings": False,
            },
            "vision_config": {
                "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 64,
                "fullatt_block_indexes": [0],
            },
            "tie_word_embeddings": False,
            "pad_token_id": special["<|endoftext|>"],
            "bos_token_id": special["<|im_start|>"],
            "eos_token_id": special["<|im_end|>"],
            "audio_token_index": special["<|AUDIO|>"],
            "audio_start_token_id": special["<|audio_bos|>"],
            "audio_end_token_id": special["<|audio_eos|>"],
            "vision_start_token_id": special["<|vision_bos|>"],
            "vision_end_token_id": special["<|vision_eos|>"],
            "image_token_index": special["<|IMAGE|>"],
            "video_token_index": special["<|VIDEO|>"],
        }
        backbone = {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "rope_parameters": dict(BACKBONE_ROPE),
        }
        decoder = {
            "audio_embedding_dim": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rope_parameters": dict(DECODER_ROPE),
        }
        codec = {
            "hidden_size": 32, "num_filters": 2, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64, "codebook_dim": 4,
            "vector_quantization_hidden_dimension": 4, "num_quantizers": 8, "codebook_size": 2048,
            "upsample_groups": 32, "frame_rate": 12.5,
        }
        kwargs = {
            "thinker_config": thinker, "backbone_config": backbone, "decoder_config": decoder, "codec_config": codec,
            "text_start_token_id": special["<|text_start|>"], "text_end_token_id": special["<|text_end|>"],
            "im_end_token_id": special["<|im_end|>"],
        }
        kwargs.update(overrides)
        return cls(**kwargs)


# Real Qwen2.5-Omni / Chroma ids of the special tokens a tiny model remaps (see `ChromaConfig.tiny`).
TINY_SPECIAL_TOKENS_REAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|AUDIO|>": 151646,
    "<|audio_bos|>": 151647,
    "<|audio_eos|>": 151648,
    "<|vision_bos|>": 151652,
    "<|vision_eos|>": 151653,
    "<|IMAGE|>": 151655,
    "<|VIDEO|>": 151656,
    "<|text_start|>": 151665,
    "<|text_end|>": 151666,
}


__all__ = ["ChromaBackboneConfig", "ChromaDecoderConfig", "ChromaConfig"]
