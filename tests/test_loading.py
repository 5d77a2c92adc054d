"""Loading the published checkpoint layout: three ways in, the audio-table tie, the skipped vision tower, and every
key of the real 6 B checkpoint (tests/fixtures/keys_real.tsv) landing in the real-size model."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import openchroma
from conftest import FIXTURES, reference
from openchroma import ChromaConfig, ChromaForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
# the files a model folder needs for trust_remote_code (the processor's file travels with the processor)
HUB_FILES = sorted(path.name for path in REPO.glob("*_chroma.py") if path.name != "processing_chroma.py")
AUDIO_TABLE = "audio_embedding.embed_audio_tokens.weight"


def checkpoint_tensors(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_loaded_exactly(model, tensors):
    """Every checkpoint tensor (vision tower aside) sits in the model under some name, bit-identical."""
    values = list(model.state_dict().values())
    for key, tensor in tensors.items():
        if ".visual." in key:
            continue
        assert any(v.shape == tensor.shape and torch.equal(v, tensor) for v in values), key


def test_from_pretrained_our_class_no_missing_no_unexpected():
    ref = reference("reference_tiny")
    model, info = ChromaForConditionalGeneration.from_pretrained(ref.checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tensors = checkpoint_tensors(ref.checkpoint)
    assert any(".visual." in k for k in tensors), "the fixture stores a vision tower, as the published file does"
    assert_loaded_exactly(model, tensors)
    table = tensors["decoder." + AUDIO_TABLE]
    assert model.backbone.audio_embedding.embed_audio_tokens.weight is model.decoder.audio_embedding.embed_audio_tokens.weight
    assert torch.equal(model.backbone.audio_embedding.embed_audio_tokens.weight, table)


def test_vision_tower_not_allocated_unless_asked():
    ref = reference("reference_tiny")
    model = ref.model()
    assert not any("visual" in name for name, _ in model.named_parameters())
    config = ChromaConfig.from_pretrained(ref.checkpoint, load_vision_tower=True)
    with_vision = ChromaForConditionalGeneration.from_pretrained(ref.checkpoint, config=config)
    assert any("visual" in name for name, _ in with_vision.named_parameters())


@pytest.mark.parametrize("stored", ["backbone", "both"])
def test_audio_table_tie_from_either_copy(tmp_path, stored):
    """The shared audio table loads whichever copy the checkpoint holds."""
    ref = reference("reference_tiny")
    tensors = checkpoint_tensors(ref.checkpoint)
    table = tensors["decoder." + AUDIO_TABLE]
    if stored == "backbone":
        tensors["backbone." + AUDIO_TABLE] = tensors.pop("decoder." + AUDIO_TABLE)
    else:
        tensors["backbone." + AUDIO_TABLE] = table.clone()
    shutil.copy(ref.checkpoint / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, info = ChromaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(model.backbone.audio_embedding.embed_audio_tokens.weight, table)
    assert torch.equal(model.decoder.audio_embedding.embed_audio_tokens.weight, table)
    codes = model.eval().generate(**ref.inputs, max_new_tokens=3)
    assert codes[0].numpy().tolist() == ref.expected["gen_codes"][:3].tolist()


def test_auto_model_after_importing_package():
    ref = reference("reference_tiny")
    model, info = AutoModelForCausalLM.from_pretrained(ref.checkpoint, output_loading_info=True)
    assert isinstance(model, ChromaForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_save_pretrained_writes_auto_map_and_hub_files(tmp_path):
    ref = reference("reference_tiny")
    ref.model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_chroma.ChromaConfig",
        "AutoModelForCausalLM": "modeling_chroma.ChromaForConditionalGeneration",
    }
    for name in HUB_FILES:
        assert (tmp_path / name).read_text() == (REPO / name).read_text()
    reloaded = ChromaForConditionalGeneration.from_pretrained(tmp_path)
    original = ref.model().state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key


REMOTE_SCRIPT = """
import sys, json, numpy as np, torch
from transformers import AutoModelForCausalLM
folder, fixture = sys.argv[1], sys.argv[2]
model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
inputs = {k: torch.from_numpy(v) for k, v in np.load(fixture + "/inputs.npz").items()}
codes = model.eval().generate(**inputs, max_new_tokens=4)
print(json.dumps({
    "module": type(model).__module__,
    "openchroma_imported": any(m.split(".")[0] == "openchroma" for m in sys.modules),
    "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
    "codes": codes[0].tolist(),
}))
"""


def test_trust_remote_code_on_fixture_folder_with_our_hub_files(tmp_path):
    """How a user runs our code next to the published weights: copy the hub files in and add an auto_map."""
    ref = reference("reference_tiny")
    folder = tmp_path / "Chroma-4B"
    shutil.copytree(ref.checkpoint, folder)
    for name in HUB_FILES:
        shutil.copy(REPO / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_chroma.ChromaConfig",
        "AutoModelForCausalLM": "modeling_chroma.ChromaForConditionalGeneration",
    }
    (folder / "config.json").write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(ref.root)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules")
    assert not report["openchroma_imported"]
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["codes"] == ref.expected["gen_codes"][:4].tolist()


def _template(key):
    return re.sub(r"\.\d+\.", ".{}.", key), re.findall(r"\.(\d+)\.", key)


def learned_key_renames():
    """Checkpoint-name template -> model-name template, learned by loading the tiny official checkpoint (whose key
    patterns equal the real file's) and locating each stored tensor in the model by value, name suffix and shape.
    Whatever renaming the installed transformers applies on load (5.2x restructured the thinker and Mimi) is
    captured this way, without hard-coding it."""
    ref = reference("reference_tiny")
    state = ref.model().state_dict()
    renames = {}
    for key, tensor in checkpoint_tensors(ref.checkpoint).items():
        if ".visual." in key:
            continue
        template, indices = _template(key)
        matches = [
            name for name, value in state.items()
            if name.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1] and _template(name)[1] == indices
            and value.shape == tensor.shape and torch.equal(value, tensor)
        ]
        assert len(matches) >= 1, key
        # equal tensors in two places (e.g. constant buffers) are told apart by the longest common name suffix
        best = max(matches, key=lambda n: len(_common_suffix(n, key)))
        renames[template] = _template(best)[0]
    return renames


def _common_suffix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def test_every_real_checkpoint_key_lands_in_real_size_model():
    """keys_real.tsv (1907 tensors of the 6 B checkpoint) against the real-size model built on the meta device."""
    rows = [line.split("\t") for line in (FIXTURES / "keys_real.tsv").read_text().splitlines()[1:]]
    real = {key: tuple(json.loads(shape)) for key, shape, _ in rows}
    config = ChromaConfig(**json.loads((FIXTURES / "config_real.json").read_text()))
    with torch.device("meta"):
        model = ChromaForConditionalGeneration(config)
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    renames = learned_key_renames()
    landed = set()
    for key, shape in real.items():
        if ".visual." in key:
            continue  # skipped on load (load_vision_tower=False)
        template, indices = _template(key)
        # keys the tiny checkpoint does not store (the backbone copy of the tied table) keep their name
        target = renames.get(template, template).format(*indices)
        assert target in state, f"{key} -> {target} not in the model"
        assert state[target] == shape, f"{key}: checkpoint {shape}, model {state[target]}"
        landed.add(target)
    not_filled = set(state) - landed
    assert not not_filled, sorted(not_filled)[:10]
    vision = sum(1 for k in real if ".visual." in k)
    assert len(real) - vision == len(landed)
