"""The house rules of the repository (DEVELOPERS.md, Layout): the root holds the hub files only, save_pretrained copies
exactly those, hub files import nothing beyond torch/transformers/numpy/stdlib (librosa/soundfile in the processor)
and each other, and everything else lives in package folders with plain names."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HUB_FILES = sorted(path.name for path in REPO.glob("*_chroma.py"))
PACKAGE_FOLDERS = ("cli", "serving", "testing", "training", "quantization")
STDLIB = set(sys.stdlib_module_names)


def top_level_imports(path):
    """-> [(absolute root module or None, relative module or None)] of the imports at the top level of `path`."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((None, node.module) if node.level else (node.module.split(".")[0], None))
    return found


def test_root_holds_only_hub_files_and_packaging():
    python_files = {path.name for path in REPO.glob("*.py")}
    assert python_files == set(HUB_FILES) | {"__init__.py"}
    for folder in PACKAGE_FOLDERS:
        assert (REPO / folder / "__init__.py").is_file(), folder
        assert not list((REPO / folder).rglob("*_chroma.py")), f"{folder}/ has a remote-code style name"


@pytest.mark.parametrize("name", HUB_FILES)
def test_hub_files_import_only_torch_transformers_numpy_stdlib_and_each_other(name):
    """transformers' remote-code loader demands every top-level import be installed, and copies only siblings
    imported as `from .x import y`: a hub file that reached into openchroma's folders would break remote code."""
    allowed = STDLIB | {"torch", "transformers", "numpy"}
    if name == "processing_chroma.py":
        allowed |= {"librosa", "soundfile"}
    for absolute, relative in top_level_imports(REPO / name):
        if relative is not None:
            assert f"{relative}.py" in HUB_FILES, (name, relative)
        else:
            assert absolute in allowed, (name, absolute)
    # nested imports (inside functions) must not reach the package folders either
    source = (REPO / name).read_text()
    for folder in PACKAGE_FOLDERS:
        assert f"from .{folder}" not in source and f"openchroma.{folder}" not in source, (name, folder)


SAVE = """
import sys
from openchroma.testing import save_tiny_checkpoint
save_tiny_checkpoint(sys.argv[1])
"""

REMOTE_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoProcessor
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
voice = torch.randn(24000).numpy() * 0.1
inputs = processor([{"role": "user", "content": "Hello there."}], prompt_audio=(voice, 24000), prompt_text="Hi.")
out = model.generate(**inputs, max_new_tokens=2)
print(json.dumps({
    "model": type(model).__module__, "processor": type(processor).__module__,
    "openchroma_imported": any(m.split(".")[0] == "openchroma" for m in sys.modules),
    "frames": int(out.shape[1]),
}))
"""


def test_saved_tiny_checkpoint_carries_exactly_the_hub_files_and_loads_as_remote_code(tmp_path):
    """`save_tiny_checkpoint` writes what the published checkpoint has: the copied .py files are exactly the hub files
    (byte-identical), and AutoModelForCausalLM / AutoProcessor load the folder with trust_remote_code in a fresh
    interpreter that never imports openchroma."""
    folder = tmp_path / "tiny"
    subprocess.run([sys.executable, "-c", SAVE, str(folder)], check=True, cwd=tmp_path)
    copied = sorted(path.name for path in folder.glob("*.py"))
    assert copied == HUB_FILES
    for name in copied:
        assert (folder / name).read_bytes() == (REPO / name).read_bytes(), name
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", REMOTE_LOAD, str(folder)], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["model"].startswith("transformers_modules.")
    assert loaded["processor"].startswith("transformers_modules.")
    assert not loaded["openchroma_imported"]
    assert loaded["frames"] == 2


def test_entry_points_name_the_package_modules():
    """The console script and the `python -m` entry points resolve to the moved modules."""
    text = (REPO / "pyproject.toml").read_text()
    assert 'openchroma = "openchroma.cli:main"' in text
    for folder in ("cli", "serving", "training"):
        assert (REPO / folder / "__main__.py").is_file(), folder
