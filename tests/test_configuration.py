"""ChromaConfig reads config.json as the official code writes it, both RoPE spellings, and takes every id from fields."""

import json
from pathlib import Path

import pytest

from conftest import FIXTURES
from openchroma import ChromaBackboneConfig, ChromaConfig, ChromaDecoderConfig

REPO = Path(__file__).resolve().parents[1]
LLAMA3_BACKBONE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 0.125,
                   "high_freq_factor": 0.5, "original_max_position_embeddings": 1024}


def test_published_defaults():
    config = ChromaConfig()
    assert (config.im_end_token_id, config.text_start_token_id, config.text_end_token_id) == (151645, 151665, 151666)
    assert (config.codebook_pad_token_id, config.codebook_eos_token_id, config.audio_num_codebooks) == (2050, 0, 8)
    assert config.audio_frame_freq == 1920 and config.audio_frames_per_text_token == 2
    assert (config.loss_stride, config.decoder_loss_weight) == (16, 0.5)
    b, d = config.backbone_config, config.decoder_config
    assert (b.hidden_size, b.num_hidden_layers, b.num_attention_heads, b.num_key_value_heads, b.head_dim) == (2048, 16, 32, 8, 64)
    assert (b.intermediate_size, b.vocab_size, b.rms_norm_eps) == (8192, 2051, 1e-5)
    assert b.rope_parameters == LLAMA3_BACKBONE
    assert (d.hidden_size, d.num_hidden_layers, d.num_attention_heads, d.num_key_value_heads, d.head_dim) == (1024, 4, 8, 2, 128)
    assert (d.audio_embedding_dim, d.max_position_embeddings) == (2048, 33)
    assert d.rope_parameters["low_freq_factor"] == 1 / 512 and d.rope_parameters["original_max_position_embeddings"] == 16
    assert config.codec_config.num_quantizers == 8 and config.codec_config.frame_rate == 12.5
    assert config.codebook_size == 2048


def test_reads_official_config_json():
    config = ChromaConfig.from_pretrained(FIXTURES / "reference_tiny" / "checkpoint")
    raw = json.loads((FIXTURES / "reference_tiny" / "checkpoint" / "config.json").read_text())
    assert config.im_end_token_id == raw["im_end_token_id"] == 1002
    assert config.backbone_config.hidden_size == 64 and config.decoder_config.hidden_size == 32
    assert config.backbone_config.rope_parameters == raw["backbone_config"]["rope_parameters"]
    assert config.codec_config.frame_rate == 12.5  # written as `_frame_rate` by transformers 5.0.0rc0
    assert config.thinker_config.text_config.vocab_size == 1100


def test_real_config_json():
    config = ChromaConfig(**json.loads((FIXTURES / "config_real.json").read_text()))
    assert config.thinker_config.text_config.hidden_size == config.backbone_config.hidden_size == 2048


def test_both_rope_spellings():
    legacy = {k: v for k, v in LLAMA3_BACKBONE.items() if k != "rope_theta"}
    assert ChromaBackboneConfig(rope_scaling=legacy, rope_theta=500000.0).rope_parameters == LLAMA3_BACKBONE
    assert ChromaBackboneConfig(rope_parameters=LLAMA3_BACKBONE).rope_parameters == LLAMA3_BACKBONE
    legacy_type = dict(legacy, type=legacy["rope_type"])
    del legacy_type["rope_type"]
    assert ChromaBackboneConfig(rope_scaling=legacy_type, rope_theta=500000.0).rope_parameters == LLAMA3_BACKBONE
    assert ChromaDecoderConfig().rope_parameters["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="rope_type"):
        ChromaBackboneConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0})


def test_round_trip(tmp_path):
    config = ChromaConfig.tiny(audio_frames_per_text_token=3)
    config.save_pretrained(tmp_path)
    again = ChromaConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoConfig"] == "configuration_chroma.ChromaConfig"


def test_inconsistent_configs_raise():
    with pytest.raises(ValueError, match="audio_num_codebooks"):
        ChromaConfig(backbone_config={"audio_num_codebooks": 4})
    with pytest.raises(ValueError, match="audio_frames_per_text_token"):
        ChromaConfig(audio_frames_per_text_token=0)


def test_tiny_config_matches_fixture_sizes():
    tiny = ChromaConfig.tiny()
    fixture = ChromaConfig.from_pretrained(FIXTURES / "reference_tiny" / "checkpoint")
    for name in ("im_end_token_id", "text_start_token_id", "text_end_token_id"):
        assert getattr(tiny, name) == getattr(fixture, name)
    for sub in ("backbone_config", "decoder_config"):
        a, b = getattr(tiny, sub).to_dict(), getattr(fixture, sub).to_dict()
        for key in ("hidden_size", "num_hidden_layers", "head_dim", "intermediate_size", "rope_parameters"):
            assert a[key] == b[key], (sub, key)
