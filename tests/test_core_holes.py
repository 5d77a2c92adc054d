"""Correctness holes of the model core (issue 11, items 4 and 5): each test here failed before its fix.

- the shared audio table is one Parameter whichever copies a checkpoint stores (transformers 5.0 and 5.2x);
- a right-padded thinker prompt answers like the unpadded one (its last real position is read, not the pad slot);
- the thinker prefill runs the lm_head on one position per row only;
- a `ChromaVoice` from the installed package works with a model loaded as remote code;
- a voice's cached prefix keys/values are never reused for another model or after the weights change in place;
- batched cached voices of different lengths equal their solo runs, logits included;
- the published sampling defaults.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import reference, tiny_model
from openchroma import ChromaForConditionalGeneration, ChromaGenerator, ChromaVoice, SamplingParams
from test_generation import variant_inputs

BACKBONE_TABLE = "backbone.audio_embedding.embed_audio_tokens.weight"
DECODER_TABLE = "decoder.audio_embedding.embed_audio_tokens.weight"


def thinker_only(inputs):
    return {k: v for k, v in inputs.items() if k.startswith("thinker_")}


def assert_same_answer(out, solo, row=0):
    """Row `row` of `out` equals row 0 of `solo`: codes, text ids, and codebook-0 / depth logits to 1e-5."""
    n = int(solo.audio_lengths[0])
    assert int(out.audio_lengths[row]) == n
    assert out.sequences[row, :n].tolist() == solo.sequences[0, :n].tolist()
    t = int(solo.text_lengths[0])
    assert out.text_sequences[row, :t].tolist() == solo.text_sequences[0, :t].tolist()
    steps = len(solo.logits)
    torch.testing.assert_close(torch.stack(out.logits[:steps], 1)[row], torch.stack(solo.logits, 1)[0],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(out.depth_logits[:steps], 1)[row], torch.stack(solo.depth_logits, 1)[0],
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# (a) the shared audio table
# ---------------------------------------------------------------------------------------------------------------------


def save_with_both_tables(folder):
    """A tiny checkpoint that stores both names of the audio table, as the official `save_pretrained` writes it."""
    model = tiny_model(seed=4)
    model.save_pretrained(folder)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    table = tensors.get(DECODER_TABLE, tensors.get(BACKBONE_TABLE))
    tensors[BACKBONE_TABLE], tensors[DECODER_TABLE] = table.clone(), table.clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return model


def test_checkpoint_with_both_table_copies_loads_one_shared_parameter(tmp_path):
    from openchroma.training.finetune import set_trainable

    original = save_with_both_tables(tmp_path / "both")
    model = ChromaForConditionalGeneration.from_pretrained(tmp_path / "both", dtype=torch.float32)
    table = model.backbone.audio_embedding.embed_audio_tokens.weight
    assert model.decoder.audio_embedding.embed_audio_tokens.weight is table
    torch.testing.assert_close(table, original.backbone.audio_embedding.embed_audio_tokens.weight, atol=0, rtol=0)
    # fine-tuning trains one table: one trainable tensor of its shape, and a step moves both names together
    set_trainable(model)
    tables = [p for p in model.parameters() if p.requires_grad and p.shape == table.shape]
    assert len(tables) == 1 and tables[0] is table
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    codes = torch.randint(0, model.config.codebook_size, (1, 4, model.config.audio_num_codebooks))
    loss = model.embed_frames(codes).sum() + model.decoder.audio_embedding(codes[..., :3]).sum()
    loss.backward()
    optimizer.step()
    assert not torch.equal(table, original.backbone.audio_embedding.embed_audio_tokens.weight)
    assert model.decoder.audio_embedding.embed_audio_tokens.weight is table
    # a save/reload round trip keeps it tied
    model.save_pretrained(tmp_path / "again")
    again = ChromaForConditionalGeneration.from_pretrained(tmp_path / "again", dtype=torch.float32)
    reloaded = again.backbone.audio_embedding.embed_audio_tokens.weight
    assert again.decoder.audio_embedding.embed_audio_tokens.weight is reloaded
    torch.testing.assert_close(reloaded, table, atol=0, rtol=0)


def test_checkpoint_with_two_different_tables_is_refused(tmp_path):
    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    table = tensors.get(DECODER_TABLE, tensors.get(BACKBONE_TABLE))
    tensors[BACKBONE_TABLE], tensors[DECODER_TABLE] = table.clone(), table + 1
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="two different audio tables"):
        ChromaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# (b) right-padded thinker prompts, (e) the lm_head on the last position only
# ---------------------------------------------------------------------------------------------------------------------


def right_padded(inputs, pad):
    padded = dict(inputs)
    ids, mask = inputs["thinker_input_ids"], inputs["thinker_attention_mask"]
    padded["thinker_input_ids"] = torch.cat([ids, ids.new_full((ids.shape[0], pad), 1000)], dim=1)
    padded["thinker_attention_mask"] = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
    return padded


@pytest.mark.parametrize("static_thinker", [True, False])
def test_right_padded_thinker_prompt_answers_like_the_unpadded_one(static_thinker):
    ref = reference("reference_tiny_stop")
    model = ref.model()
    runner_inputs = model.prepare_generation_inputs(**ref.inputs)
    padded_inputs = model.prepare_generation_inputs(**right_padded(ref.inputs, 3))
    outputs = []
    for inputs in (runner_inputs, padded_inputs):
        runner = ChromaGenerator(model, static_thinker=static_thinker)
        outputs.append(runner.finalize(runner.generate(inputs, 12)))
    assert_same_answer(outputs[1], outputs[0])


def test_batch_of_right_padded_rows_equals_solo_runs():
    ref = reference("reference_tiny")
    model = ref.model()
    other = variant_inputs(ref, seed=5)
    other = {**other, "thinker_input_ids": other["thinker_input_ids"][:, 3:],
             "thinker_attention_mask": other["thinker_attention_mask"][:, 3:]}
    rows = [right_padded(ref.inputs, 0), right_padded(other, 3)]
    batch = {k: torch.cat([r[k] for r in rows]) if k.startswith("thinker_") else torch.cat([ref.inputs[k]] * 2)
             for k in ref.inputs}
    out = model.generate(**batch, max_new_tokens=8, return_dict_in_generate=True, output_logits=True)
    for b, inputs in enumerate([ref.inputs, {**ref.inputs, **thinker_only(other)}]):
        solo = model.generate(**inputs, max_new_tokens=8, return_dict_in_generate=True, output_logits=True)
        assert_same_answer(out, solo, row=b)


def test_thinker_prefill_computes_logits_for_the_last_position_only():
    ref = reference("reference_tiny")
    model = ref.model()
    rows_seen = []
    hook = model.thinker.lm_head.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[:-1]))
    try:
        runner = ChromaGenerator(model)
        runner.thinker_prefill(ref.inputs["thinker_input_ids"], ref.inputs["thinker_attention_mask"],
                               ref.inputs["thinker_input_features"], ref.inputs["thinker_feature_attention_mask"])
    finally:
        hook.remove()
    assert rows_seen and all(shape.numel() == 1 for shape in rows_seen), rows_seen


# ---------------------------------------------------------------------------------------------------------------------
# (c) voices across both ways of loading, (d) the voice's prefix cache
# ---------------------------------------------------------------------------------------------------------------------

REMOTE_VOICE_SCRIPT = """
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
folder, inputs_file, voice_file = sys.argv[1], sys.argv[2], sys.argv[3]
inputs = {k: torch.from_numpy(v) for k, v in np.load(inputs_file).items()}
thinker = {k: v for k, v in inputs.items() if k.startswith("thinker_")}
remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
own = remote.encode_voice(inputs["input_values"][0, 0], inputs["input_ids"][0], transcript="hi")
own.save(voice_file)
import openchroma  # the README's Voices snippet: a voice file loaded through the installed package
voice = openchroma.ChromaVoice.load(voice_file)
print(json.dumps({"classes_differ": type(voice) is not type(own), "remote_module": type(remote).__module__,
                  "package": remote.generate(**thinker, voice=voice, max_new_tokens=6).tolist(),
                  "package_again": remote.generate(**thinker, voice=[voice], max_new_tokens=6).tolist(),
                  "own": remote.generate(**thinker, voice=own, max_new_tokens=6).tolist()}))
"""


def test_installed_package_voice_works_with_remote_code_model(tmp_path):
    import numpy as np

    ref = reference("reference_tiny")
    folder = tmp_path / "model"
    tiny_model(seed=1).save_pretrained(folder)
    np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in ref.inputs.items()})
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_VOICE_SCRIPT, str(folder), str(tmp_path / "inputs.npz"),
         str(tmp_path / "voice.safetensors")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
             "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["classes_differ"] and report["remote_module"].startswith("transformers_modules"), report
    assert report["package"] == report["own"] == report["package_again"]


def uncached(voice):
    """The same voice (same codes) with an empty prefix cache."""
    return ChromaVoice(text_ids=voice.text_ids, codes=voice.codes, transcript=voice.transcript)


def test_voice_reused_across_two_models_uses_each_models_own_keys():
    ref = reference("reference_tiny")
    first, second = ref.model(), tiny_model(seed=9)
    voice = first.encode_voice(ref.inputs["input_values"][0, 0], ref.inputs["input_ids"][0])
    kwargs = dict(max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    with_first = first.generate(**thinker_only(ref.inputs), voice=voice, **kwargs)
    with_second = second.generate(**thinker_only(ref.inputs), voice=voice, **kwargs)
    fresh = second.generate(**thinker_only(ref.inputs), voice=uncached(voice), **kwargs)
    assert_same_answer(with_second, fresh)
    again = first.generate(**thinker_only(ref.inputs), voice=voice, **kwargs)
    assert_same_answer(again, with_first)


def test_voice_cache_follows_in_place_weight_changes():
    ref = reference("reference_tiny")
    model = tiny_model(seed=6)
    voice = model.encode_voice(ref.inputs["input_values"][0, 0], ref.inputs["input_ids"][0])
    kwargs = dict(max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    model.generate(**thinker_only(ref.inputs), voice=voice, **kwargs)  # caches the prefix for these weights
    model.load_state_dict(tiny_model(seed=7).state_dict())  # new weights, same Parameter objects
    after_load = model.generate(**thinker_only(ref.inputs), voice=voice, **kwargs)
    assert_same_answer(after_load, model.generate(**thinker_only(ref.inputs), voice=uncached(voice), **kwargs))
    with torch.no_grad():  # an in-place change to one backbone weight (as an optimizer step makes)
        model.backbone.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    after_step = model.generate(**thinker_only(ref.inputs), voice=voice, **kwargs)
    assert_same_answer(after_step, model.generate(**thinker_only(ref.inputs), voice=uncached(voice), **kwargs))


# ---------------------------------------------------------------------------------------------------------------------
# (5) batched cached voices of different lengths, the published sampling defaults
# ---------------------------------------------------------------------------------------------------------------------


def test_batched_cached_voices_of_different_lengths_equal_solo_runs():
    """Rows whose cached voice prefixes differ in length: every row's codes, text and logits equal its solo run
    (a wrong next RoPE position moves the logits by ~5e-3 without flipping a code on the tiny model)."""
    ref = reference("reference_tiny")
    model = ref.model()
    wave, ids = ref.inputs["input_values"][0, 0], ref.inputs["input_ids"][0]
    voices = [model.encode_voice(wave, ids), model.encode_voice(wave[: 11 * 1920], ids[:5]),
              model.encode_voice(wave[4000:], ids[3:])]
    rows = [thinker_only(ref.inputs), thinker_only(variant_inputs(ref, seed=3)), thinker_only(ref.inputs)]
    kwargs = dict(max_new_tokens=8, return_dict_in_generate=True, output_logits=True)
    solos = [model.generate(**row, voice=v, **kwargs) for row, v in zip(rows, voices)]  # also caches the prefixes
    batch = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    out = model.generate(**batch, voice=voices, **kwargs)
    for b, solo in enumerate(solos):
        assert_same_answer(out, solo, row=b)


def test_published_sampling_defaults():
    """generate(do_sample=True) samples codebook 0 and the depth decoder with temperature 1, top-k 50, top-p 1, the
    thinker greedily, for at most 1000 frames."""
    assert SamplingParams() == SamplingParams(do_sample=False, temperature=1.0, top_k=50, top_p=1.0)
    ref = reference("reference_tiny")
    model = ref.model()
    out = model.generate(**ref.inputs, max_new_tokens=6, do_sample=True, seed=5, return_dict_in_generate=True)
    published = SamplingParams(do_sample=True, temperature=1.0, top_k=50, top_p=1.0)
    runner = ChromaGenerator(model, published, text_sampling=SamplingParams(),
                             generator=torch.Generator().manual_seed(5))
    expected = runner.finalize(runner.generate(model.prepare_generation_inputs(**ref.inputs), 6))
    assert out.sequences.tolist() == expected.sequences.tolist()
    assert out.text_sequences.tolist() == expected.text_sequences.tolist()
    other = ChromaGenerator(model, SamplingParams(do_sample=True, top_k=5), generator=torch.Generator().manual_seed(5))
    assert other.finalize(other.generate(model.prepare_generation_inputs(**ref.inputs), 6)).sequences.tolist() \
        != expected.sequences.tolist()
    from openchroma.generation_chroma import DEFAULT_MAX_NEW_TOKENS

    assert DEFAULT_MAX_NEW_TOKENS == 1000


# ---------------------------------------------------------------------------------------------------------------------
# generate(..., output_audio=True) (issue 14)
# ---------------------------------------------------------------------------------------------------------------------


def test_output_audio_equals_decoding_each_rows_codes():
    """Waveforms next to the codes: row b's audio is Mimi's decode of its own valid codes, and nothing else."""
    ref = reference("reference_tiny_stop")
    model = ref.model()
    rows = [ref.inputs, variant_inputs(ref, seed=7)]
    from test_generation import batch_of

    frames = 10

    def stop_row_1(state):  # rows of different lengths
        return torch.tensor([False, state.frame_count >= 6])

    out = model.generate(**batch_of(rows), max_new_tokens=frames, stopping_criteria=[stop_row_1], output_audio=True)
    assert len(out.audio) == 2 and out.sequences.shape[0] == 2
    frame = model.config.audio_frame_freq
    for b in range(2):
        n = int(out.audio_lengths[b])
        with torch.no_grad():
            alone = model.codec_model.decode(out.sequences[b:b + 1, :n].transpose(1, 2)).audio_values[0, 0]
        assert out.audio[b].shape == (n * frame,) and out.audio[b].dtype == torch.float32
        torch.testing.assert_close(out.audio[b], alone.float(), atol=1e-5 * float(alone.abs().max()), rtol=0)
    assert out.audio_lengths.tolist() == [frames, 6]
    plain = model.generate(**batch_of(rows), max_new_tokens=frames, stopping_criteria=[stop_row_1])
    assert torch.equal(plain, out.sequences)
