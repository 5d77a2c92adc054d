"""The model card's snippet (as printed in README.md) on a tiny checkpoint folder through AutoProcessor /
AutoModelForCausalLM with trust_remote_code, and processor + generate batching (issue 3)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import soundfile as sf
import torch

from conftest import tiny_model
from openchroma.testing import build_tiny_processor, save_tiny_processor

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def readme_snippet():
    text = (REPO / "README.md").read_text()
    section = text[text.index("### The model card's snippet"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_model_card_snippet_runs_verbatim_with_trust_remote_code(tmp_path):
    folder = tmp_path / "Chroma-tiny"
    tiny_model(seed=1).save_pretrained(folder)
    save_tiny_processor(folder)
    code = readme_snippet()
    # the only edits: our tiny folder instead of the hub id, CPU float32, fewer frames
    code = code.replace('"FlashLabs/Chroma-4B"', repr(str(folder)))
    code = code.replace("dtype=torch.bfloat16, device_map=\"auto\"", "dtype=torch.float32")
    code = code.replace("max_new_tokens=100", "max_new_tokens=12")
    code = code.replace('"output.wav"', repr(str(tmp_path / "output.wav")))
    script = tmp_path / "snippet.py"
    script.write_text(code + "\nimport sys, json\nprint(json.dumps({'modules': sorted(m for m in sys.modules "
                      "if m.split('.')[0] == 'openchroma'), 'codes': output.sequences.tolist(), "
                      "'text': output.text_sequences.tolist()}))\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["modules"] == [], "the snippet must run on remote code only"
    # the printed line is the answer's text: the decoded text ids of the generated answer
    expected = build_tiny_processor().batch_decode(torch.tensor(report["text"]), skip_special_tokens=True)[0]
    assert result.stdout.endswith(expected + "\n" + lines[-1] + "\n"), (expected, result.stdout[-500:])
    codes = torch.tensor(report["codes"])  # [1, T, K]
    assert codes.shape[0] == 1 and 1 <= codes.shape[1] <= 12 and codes.shape[2] == 8
    wave, rate = sf.read(str(tmp_path / "output.wav"))
    assert rate == 24000 and wave.ndim == 1 and len(wave) == 1920 * codes.shape[1]  # one 80 ms frame per code row
    for name in ("configuration_chroma.py", "modeling_chroma.py", "generation_chroma.py", "processing_chroma.py"):
        assert (folder / name).exists(), name


def test_processor_batch_equals_solo_generate():
    """Different question lengths, voices and transcripts in one processor batch: every row equals its solo run."""
    model = tiny_model(seed=2)
    processor = build_tiny_processor()
    q, _ = sf.read(str(EXAMPLES / "question.wav"), dtype="float32")
    v, rate = sf.read(str(EXAMPLES / "voice.wav"), dtype="float32")
    conversations = [
        [{"role": "user", "content": [{"type": "audio", "audio": (q, rate)}]}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "audio", "audio": (q[: rate], rate)}]}],
        [{"role": "user", "content": "A text-only question, a little longer than the others."}],
    ]
    voices = [(v, rate), (v[: int(1.3 * rate)], rate), (v[rate:], rate)]
    texts = ["Hi, I am Nova. I love to read books by the sea.", "Hi.", "I love to read books."]
    batch = processor(conversations, add_generation_prompt=True, tokenize=False, prompt_audio=voices, prompt_text=texts)
    out = model.generate(**batch, max_new_tokens=8, return_dict_in_generate=True)
    for b in range(3):
        solo_inputs = processor([conversations[b]], add_generation_prompt=True, tokenize=False,
                                prompt_audio=[voices[b]], prompt_text=[texts[b]])
        solo = model.generate(**solo_inputs, max_new_tokens=8, return_dict_in_generate=True)
        n = int(solo.audio_lengths[0])
        assert int(out.audio_lengths[b]) == n
        assert out.sequences[b, :n].tolist() == solo.sequences[0, :n].tolist(), b
        t = int(solo.text_lengths[0])
        assert out.text_sequences[b, :t].tolist() == solo.text_sequences[0, :t].tolist(), b
    decoded = processor.batch_decode(out.text_sequences, skip_special_tokens=True)
    for b in range(3):  # each row's text is its own ids only (the pad id after a shorter row is skipped)
        ids = out.text_sequences[b, : int(out.text_lengths[b])]
        assert decoded[b] == processor.tokenizer.decode(ids, skip_special_tokens=True)
