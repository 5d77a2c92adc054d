"""Quantized loading through transformers' quantization configs (issue 16): openchroma.quantization, the decode fast
paths with quantized weights, --quantize in the CLI and the server, and the errors of modes a device cannot run.

CPU: torchao int8 (CI). CUDA only (marked gpu): torchao int4, bitsandbytes 8-bit and 4-bit, int8 on CUDA."""

import pytest
import torch
from torch import nn

from conftest import reference
from openchroma import ChromaConfig, ChromaForConditionalGeneration
from openchroma.quantization import (
    ALWAYS_KEPT, MODES, QuantizationError, check_mode, from_pretrained_kwargs, load_quantized, modules_to_keep,
    weight_bytes,
)
from openchroma.testing import save_tiny_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wide_tiny_overrides():
    """The tiny configuration with 128-wide thinker text model, backbone and depth-decoder input, so that int4's
    group size (128) divides the in-features of their linears (the plain tiny model's 64 would be skipped)."""
    base = ChromaConfig.tiny()
    thinker = base.thinker_config.to_dict()
    thinker["text_config"].update(hidden_size=128, intermediate_size=256, num_attention_heads=8)  # head_dim 16
    thinker["audio_config"]["output_dim"] = 128
    thinker["vision_config"]["out_hidden_size"] = 128
    backbone = base.backbone_config.to_dict()
    backbone.update(hidden_size=128, intermediate_size=256, head_dim=32)
    decoder = base.decoder_config.to_dict()
    decoder.update(audio_embedding_dim=128)
    return {"thinker_config": thinker, "backbone_config": backbone, "decoder_config": decoder}


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide_tiny")
    model, _ = save_tiny_checkpoint(folder, **wide_tiny_overrides())
    return folder, model


def is_quantized(weight) -> bool:
    return type(weight) not in (torch.Tensor, nn.Parameter)


def quantized_linears(model):
    """Names of the linear layers whose weight (torchao) or module (bitsandbytes) was quantized."""
    return {name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (is_quantized(module.weight) or type(module) is not nn.Linear)}


def greedy(model, frames=6):
    """-> (codes [1, T, K], codebook-0 logits [1, T, V] float32 on the CPU) of a greedy answer to the fixture."""
    device = model.backbone.codebook0_head.weight.device
    inputs = {k: v.to(device) for k, v in reference("reference_tiny").inputs.items()}
    out = model.generate(**inputs, max_new_tokens=frames, return_dict_in_generate=True, output_logits=True)
    return out.sequences.cpu(), torch.stack(out.logits, dim=1).float().cpu()


def check_mode_end_to_end(folder, float_model, mode, device, tmp_path):
    """Load quantized, check which parts are, generate next to float32, stream, save and reload."""
    model = load_quantized(folder, mode, device)
    names = quantized_linears(model)
    assert any(n.startswith("thinker.") for n in names) and any(n.startswith("backbone.model.") for n in names)
    kept = [n for n in names if n.startswith(("codec_model", "decoder")) or n in ALWAYS_KEPT]
    assert not kept, f"{mode} quantized parts that stay in full precision: {kept}"
    assert weight_bytes(model, "backbone.model.") < 0.6 * weight_bytes(float_model, "backbone.model.")
    assert weight_bytes(model, "codec_model.") == weight_bytes(float_model, "codec_model.")

    (codes, logits), (_, reference_logits) = greedy(model), greedy(float_model)
    # the first frame has the same inputs in both models: its codebook-0 logits differ by the quantization only
    assert (logits[:, 0] - reference_logits[:, 0]).abs().max() < 0.1 * reference_logits.abs().max()
    chunks = list(model.stream(**{k: v.to(device) for k, v in reference("reference_tiny").inputs.items()},
                               max_new_tokens=6))
    streamed = torch.cat([c.audio_codes for c in chunks], dim=1)
    assert torch.equal(streamed.cpu(), codes)  # the stream is generate() of the same model
    assert sum(c.pcm.shape[-1] for c in chunks) == 6 * model.config.audio_frame_freq

    model.save_pretrained(tmp_path / mode)
    reloaded = ChromaForConditionalGeneration.from_pretrained(tmp_path / mode, device_map=str(torch.device(device)))
    assert quantized_linears(reloaded) == names
    again_codes, again_logits = greedy(reloaded)
    assert torch.equal(again_codes, codes)
    torch.testing.assert_close(again_logits, logits, atol=0, rtol=0)


def test_int8_on_cpu_loads_generates_streams_and_reloads(wide_checkpoint, tmp_path):
    pytest.importorskip("torchao")
    folder, float_model = wide_checkpoint
    check_mode_end_to_end(folder, float_model, "int8", "cpu", tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4", "bnb-8bit", "bnb-4bit"])
def test_cuda_modes_load_generate_stream_and_reload(mode, wide_checkpoint, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip(MODES[mode].package)
    folder, float_model = wide_checkpoint
    check_mode_end_to_end(folder, float_model, mode, "cuda", tmp_path)


def test_quantized_tiny_model_matches_float_output(tmp_path):
    """On the tiny checkpoint int8 keeps the float32 greedy codes and the codebook-0 logits close."""
    pytest.importorskip("torchao")
    float_model, _ = save_tiny_checkpoint(tmp_path)
    model = load_quantized(tmp_path, "int8")
    (codes, logits), (reference_codes, reference_logits) = greedy(model), greedy(float_model)
    assert torch.equal(codes, reference_codes)
    assert (logits - reference_logits).abs().max() < 0.02 * reference_logits.abs().max()
    assert not torch.equal(logits, reference_logits)  # the weights really are quantized


def test_in_memory_model_is_quantized_through_a_checkpoint():
    pytest.importorskip("torchao")
    from openchroma.testing import build_tiny_model

    model = load_quantized(build_tiny_model(), "int8")
    assert "backbone.model.layers.0.mlp.up_proj" in quantized_linears(model)


def test_parts_choose_what_is_quantized(wide_checkpoint):
    pytest.importorskip("torchao")
    folder, _ = wide_checkpoint
    model = load_quantized(folder, "int8", parts=["backbone", "decoder"])
    names = quantized_linears(model)
    assert {n.split(".")[0] for n in names} == {"backbone", "decoder"}
    assert "backbone.codebook0_head" not in names
    assert modules_to_keep(["thinker", "backbone"]) == ALWAYS_KEPT + ["decoder"]


def test_few_rows_linear_takes_f_linear_for_quantized_weights():
    """The decode fast path (W @ x^T for 2..64 float32 CPU rows) cannot read torchao's tensor subclasses: it falls
    back to F.linear, which dispatches to torchao's kernel."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from openchroma.modeling_chroma import apply_linear, few_rows_linear

    layer = nn.Linear(64, 48)
    quantize_(layer, Int8WeightOnlyConfig())
    assert is_quantized(layer.weight)
    x = torch.randn(3, 1, 64)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(few_rows_linear(x, layer.weight, layer.bias), expected)
    assert torch.equal(apply_linear(x, layer), expected)


def test_bitsandbytes_converts_the_backbone_and_thinker_linears(tmp_path):
    """bitsandbytes (transformers >= 5.2x) only converts modules whose type is exactly nn.Linear: the backbone's
    linears must be plain nn.Linear. Conversion only (bitsandbytes runs on CUDA in our modes)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    save_tiny_checkpoint(tmp_path)
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=modules_to_keep())
    model = ChromaForConditionalGeneration.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    converted = {name for name, module in model.named_modules() if type(module).__name__ == "Linear8bitLt"}
    assert "backbone.model.layers.0.self_attn.q_proj" in converted
    assert "backbone.model.layers.1.mlp.down_proj" in converted
    assert any(name.startswith("thinker.") for name in converted)
    assert not [name for name in converted if name.startswith(("decoder", "codec_model")) or name in ALWAYS_KEPT]


# -- errors ------------------------------------------------------------------------------------------------------------


def test_unknown_mode_and_parts_are_refused():
    with pytest.raises(QuantizationError, match="unknown quantization mode 'int3'.*int8, int4, bnb-8bit, bnb-4bit"):
        check_mode("int3")
    with pytest.raises(QuantizationError, match="parts must be a non-empty subset"):
        modules_to_keep(["backbone", "mimi"])
    assert issubclass(QuantizationError, ValueError)


@pytest.mark.parametrize("mode", ["int4", "bnb-8bit", "bnb-4bit"])
def test_cuda_modes_are_refused_on_the_cpu(mode):
    with pytest.raises(QuantizationError, match=f"'{mode}'.* runs on cuda only, not on cpu.*use 'int8'"):
        check_mode(mode, "cpu")


def test_int4_on_cpu_names_the_missing_kernel_package():
    with pytest.raises(QuantizationError, match="mslk"):
        from_pretrained_kwargs("int4", "cpu")


def test_modes_that_compute_in_bfloat16_refuse_float32():
    with pytest.raises(QuantizationError, match="'bnb-4bit' computes in bfloat16.*--dtype bfloat16"):
        check_mode("bnb-4bit", "cuda", torch.float32)


def test_missing_package_is_named_with_its_install_command(monkeypatch):
    import openchroma.quantization as quantization

    monkeypatch.setattr(quantization, "package_available", lambda name: name != "torchao")
    with pytest.raises(ImportError, match=r"'int8' needs the torchao package: pip install torchao"):
        check_mode("int8", "cpu")
    with pytest.raises(ImportError, match="torchao"):
        load_quantized("unused-folder", "int8")


def test_cli_refuses_a_mode_the_device_cannot_run_before_loading(capsys):
    from openchroma.cli import main

    examples = reference("reference_tiny").root.parents[2] / "examples"
    args = ["answer", str(examples / "question.wav"), "--voice", str(examples / "voice.wav"),
            "--voice-text", "hello", "-o", "out.wav", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--quantize", "bnb-4bit"])
    assert exit_info.value.code == 2
    assert "--quantize bnb-4bit: quantization mode 'bnb-4bit'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--quantize", "int2"])
    assert "invalid choice: 'int2'" in capsys.readouterr().err


def test_cli_answers_with_an_int8_model(tmp_path):
    pytest.importorskip("torchao")
    import soundfile as sf

    from openchroma.cli import main

    examples = reference("reference_tiny").root.parents[2] / "examples"
    out = tmp_path / "answer.wav"
    status = main(["answer", str(examples / "question.wav"), "--voice", str(examples / "voice.wav"), "--voice-text",
                   "hello", "-o", str(out), "--device", "cpu", "--quantize", "int8", "--max-frames", "4",
                   "--no-progress", "-q"])
    assert status == 0
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) == 4 * 1920


def test_server_refuses_a_mode_the_device_cannot_run_before_loading():
    pytest.importorskip("fastapi")
    import argparse

    from openchroma.serving.app import add_serve_arguments, serve

    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(["--device", "cpu", "--quantize", "int4"])
    with pytest.raises(SystemExit, match="--quantize int4: .*runs on cuda only"):
        serve(args)
