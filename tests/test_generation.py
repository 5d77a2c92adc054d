"""The generation loop beyond the fixtures: batches equal solo runs, stopping, output shape, the cache."""

import pytest
import torch

from conftest import reference, tiny_model
from openchroma import ChromaGenerator, SamplingParams
from openchroma.cache_chroma import padding_causal_mask
from openchroma.sampling_chroma import sample_next_token


def variant_inputs(ref, seed, text_len=None, audio_len=None):
    """Another request of the fixture's shape: other transcript ids, another voice, other thinker words/audio."""
    g = torch.Generator().manual_seed(seed)
    inputs = {k: v.clone() for k, v in ref.inputs.items()}
    text_len = text_len or inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.randint(0, 1000, (1, text_len), generator=g)
    inputs["attention_mask"] = torch.ones(1, text_len, dtype=torch.long)
    wave = inputs["input_values"]
    wave = torch.roll(wave, shifts=int(torch.randint(100, 5000, (1,), generator=g)), dims=-1) * 0.7
    if audio_len is not None:
        wave = wave[..., :audio_len]
    inputs["input_values"] = wave.contiguous()
    inputs["input_values_cutoffs"] = torch.tensor([wave.shape[-1]])
    ids = inputs["thinker_input_ids"]
    ordinary = ids < 1000  # the fixture's ordinary (non-special) thinker ids
    ids[ordinary] = torch.randint(0, 1000, (int(ordinary.sum()),), generator=g)
    feats = inputs["thinker_input_features"]
    valid = inputs["thinker_feature_attention_mask"].bool()
    feats[:, :, valid[0]] += 0.5 * torch.randn(feats[:, :, valid[0]].shape, generator=g)
    return inputs


def batch_of(rows):
    """Stack single-row inputs: thinker ids and transcripts left-padded, reference audio right-padded."""
    out = {}
    for name in ("thinker_input_ids", "input_ids"):
        mask_name = "thinker_attention_mask" if name == "thinker_input_ids" else "attention_mask"
        length = max(r[name].shape[1] for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for b, r in enumerate(rows):
            n = r[name].shape[1]
            ids[b, length - n:] = r[name][0]
            mask[b, length - n:] = r[mask_name][0]
        out[name], out[mask_name] = ids, mask
    length = max(r["input_values"].shape[-1] for r in rows)
    out["input_values"] = torch.zeros(len(rows), 1, length)
    for b, r in enumerate(rows):
        out["input_values"][b, :, : r["input_values"].shape[-1]] = r["input_values"][0]
    out["input_values_cutoffs"] = torch.cat([r["input_values_cutoffs"] for r in rows])
    out["thinker_input_features"] = torch.cat([r["thinker_input_features"] for r in rows])
    out["thinker_feature_attention_mask"] = torch.cat([r["thinker_feature_attention_mask"] for r in rows])
    return out


def solo_and_batch(model, rows, frames):
    solos = [model.generate(**r, max_new_tokens=frames, return_dict_in_generate=True, output_logits=True) for r in rows]
    batch = model.generate(**batch_of(rows), max_new_tokens=frames, return_dict_in_generate=True, output_logits=True)
    return solos, batch


def assert_row_equals_solo(batch, b, solo):
    n = int(solo.audio_lengths[0])
    assert int(batch.audio_lengths[b]) == n
    assert batch.sequences[b, :n].tolist() == solo.sequences[0, :n].tolist()
    t = int(solo.text_lengths[0])
    assert int(batch.text_lengths[b]) == t
    assert batch.text_sequences[b, :t].tolist() == solo.text_sequences[0, :t].tolist()
    for step, logits in enumerate(solo.logits):
        torch.testing.assert_close(batch.logits[step][b], logits[0], atol=1e-5, rtol=0)


def test_batch_rows_equal_solo_runs_across_a_thinker_stop():
    """Two equal-length prompts; one row's thinker stops before the other's. Each row must be exactly its solo run
    (the official batch mode drifts here: masked thinker slots still consume positions)."""
    ref = reference("reference_tiny_stop")
    model = ref.model()
    rows = [ref.inputs, variant_inputs(ref, seed=7)]
    solos, batch = solo_and_batch(model, rows, frames=14)
    stops = [int(s.text_lengths[0]) for s in solos]
    assert stops[0] != stops[1], "the two rows' thinkers must stop at different steps for this test to mean anything"
    assert all(int(s.text_sequences[0, n - 1]) == model.config.im_end_token_id for s, n in zip(solos, stops))
    for b, solo in enumerate(solos):
        assert_row_equals_solo(batch, b, solo)


def test_batch_rows_with_padding_equal_solo_runs():
    """Different transcript, voice and question lengths in one batch (left/right padding) still give solo results."""
    ref = reference("reference_tiny")
    model = ref.model()
    short = variant_inputs(ref, seed=3, text_len=5, audio_len=17000)
    short["thinker_input_ids"] = short["thinker_input_ids"][:, 3:]  # drop part of the system text
    short["thinker_attention_mask"] = short["thinker_attention_mask"][:, 3:]
    solos, batch = solo_and_batch(model, [ref.inputs, short], frames=9)
    for b, solo in enumerate(solos):
        assert_row_equals_solo(batch, b, solo)


class RecordingGenerator(ChromaGenerator):
    """Records every backbone input so a test can replay the whole sequence in one forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def backbone_step(self, state, embeds, valid):
        hidden, logits = super().backbone_step(state, embeds, valid)
        self.steps.append((embeds, valid, logits))
        return hidden, logits


def test_cached_steps_equal_one_teacher_forced_forward():
    ref = reference("reference_tiny_stop")
    model = ref.model()
    inputs = batch_of([ref.inputs, variant_inputs(ref, seed=7)])
    runner = RecordingGenerator(model)
    runner.generate({k: v for k, v in inputs.items()}, 12)
    embeds = torch.cat([e for e, _, _ in runner.steps], dim=1)
    valid = torch.cat([v for _, v, _ in runner.steps], dim=1)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        _, logits = model.backbone(embeds, positions, padding_causal_mask(valid, valid.shape[1]))
    end = 0
    for step_embeds, _, step_logits in runner.steps:
        end += step_embeds.shape[1]
        torch.testing.assert_close(logits[:, end - 1], step_logits, atol=1e-5, rtol=0)


class ScriptedEOS(ChromaGenerator):
    """Replaces chosen frames by EOS frames: {(row, frame_index): codebook-7 value}."""

    def __init__(self, model, script):
        super().__init__(model)
        self.script = script

    def depth_step(self, state, backbone_hidden, c0):
        frame, logits = super().depth_step(state, backbone_hidden, c0)
        index = len(state.frames)
        for (row, at), c7 in self.script.items():
            if at == index:
                frame[row] = 0
                frame[row, -1] = c7
        return frame, logits


def test_eos_frames_stop_rows_and_fill_the_rest():
    ref = reference("reference_tiny")
    model = ref.model()
    inputs = batch_of([ref.inputs, variant_inputs(ref, seed=5)])
    # row 0 ends at frame 2 with a non-zero codebook 7 (kept); row 1 at frame 4 with an all-zero frame (dropped)
    runner = ScriptedEOS(model, {(0, 2): 17, (1, 4): 0})
    state = runner.generate(inputs, 10)
    out = runner.finalize(state)
    assert len(state.frames) == 5  # generation stopped once every row finished (CPU checks every frame)
    assert out.audio_lengths.tolist() == [3, 4]
    assert out.sequences.shape == (2, 4, 8)
    assert out.sequences[0, 2].tolist() == [0] * 7 + [17]
    assert out.sequences[0, 3].tolist() == [0] * 8  # filled after the row's end
    # each row equals its own solo run with the same script
    for b, row in enumerate([ref.inputs, variant_inputs(ref, seed=5)]):
        step = {(0, at): c7 for (r, at), c7 in runner.script.items() if r == b}
        solo = ScriptedEOS(model, step)
        solo_out = solo.finalize(solo.generate(row, 10))
        n = int(solo_out.audio_lengths[0])
        assert n == int(out.audio_lengths[b])
        assert out.sequences[b, :n].tolist() == solo_out.sequences[0, :n].tolist()
    # the model card's decode of the whole tensor never fails
    with torch.no_grad():
        wave = model.codec_model.decode(out.sequences.permute(0, 2, 1)).audio_values
    assert wave.shape == (2, 1, 4 * model.config.audio_frame_freq)


def test_eos_on_first_frame_gives_empty_result():
    model = tiny_model()
    with torch.no_grad():
        model.backbone.codebook0_head.weight.zero_()  # all logits 0 -> argmax picks code 0 everywhere
        model.decoder.codebook_head.weight.zero_()
    ref = reference("reference_tiny")
    out = model.generate(**ref.inputs, max_new_tokens=5, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 0, 8)
    assert out.audio_lengths.tolist() == [0]


def test_max_new_tokens_counts_frames():
    ref = reference("reference_tiny")
    for n in (1, 2, 5):
        assert ref.model().generate(**ref.inputs, max_new_tokens=n).shape == (1, n, 8)


def test_special_audio_values_are_never_chosen():
    """Codes 2048..2050 exist in the 2051-way heads but not in Mimi: never sampled, greedy or not."""
    runner = ChromaGenerator(reference("reference_tiny").model())
    logits = torch.randn(4, 2051)
    logits[:, 2048:] = 100.0
    assert (runner.choose_code(logits, SamplingParams()) < 2048).all()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        params = SamplingParams(do_sample=True, temperature=2.0, top_k=0)
        runner.generator = g
        assert (runner.choose_code(logits, params) < 2048).all()


def test_sampling_controls():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    top1 = SamplingParams(do_sample=True, top_k=1)
    assert all(int(sample_next_token(logits, top1, g)) == 3 for _ in range(10))
    nucleus = SamplingParams(do_sample=True, top_k=0, top_p=0.5)  # p(3) = 0.64 > 0.5: only code 3 survives
    assert all(int(sample_next_token(logits, nucleus, g)) == 3 for _ in range(10))
    drawn = {int(sample_next_token(logits, SamplingParams(do_sample=True, top_k=0), g)) for _ in range(200)}
    assert drawn == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(do_sample=True, top_p=1.5)


def test_same_seed_same_sample():
    ref = reference("reference_tiny")
    model = ref.model()
    runs = [
        model.generate(**ref.inputs, max_new_tokens=6, do_sample=True, generator=torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.pop("input_values"), "input_values"),
        (lambda i: i.pop("thinker_input_ids"), "thinker_input_ids"),
        (lambda i: i.update(input_values=i["input_values"][0]), r"\[B, 1, T\]"),
        (lambda i: i.update(input_values=i["input_values"][..., :0]), "empty"),
        (lambda i: i.update(input_ids=torch.cat([i["input_ids"]] * 2)), "batch size"),
        (lambda i: i.pop("thinker_feature_attention_mask"), "go together"),
        (lambda i: i.update(input_values_cutoffs=torch.tensor([10**6])), "input_values_cutoffs"),
        (lambda i: i.update(input_values_cutoffs=torch.tensor([0])), "input_values_cutoffs"),
        (lambda i: i.update(input_values=i["input_values"] * float("nan")), "NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    ref = reference("reference_tiny")
    inputs = dict(ref.inputs)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        ref.model().generate(**inputs, max_new_tokens=2)


def test_bad_max_new_tokens():
    ref = reference("reference_tiny")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens"):
            ref.model().generate(**ref.inputs, max_new_tokens=bad)


def test_sample_rows_equals_sampling_each_row_alone():
    """The batched per-row sampler gives every row exactly `sample_next_token` on that row with its own generator,
    for mixed temperatures, top-k (off, 1, 50, beyond the vocabulary) and top-p (off, 0.9, 0.5), draw after draw."""
    from openchroma.sampling_chroma import SamplingParams, sample_rows

    params = [SamplingParams(True, 0.7, 50, 1.0), SamplingParams(True, 1.3, 0, 0.9), SamplingParams(True, 1.0, 1, 1.0),
              SamplingParams(True, 0.9, 5000, 0.5), SamplingParams(True, 1.0, 0, 1.0)]
    logits = torch.randn(len(params), 2048, generator=torch.Generator().manual_seed(0)) * 3
    batched = [torch.Generator().manual_seed(10 + r) for r in range(len(params))]
    alone = [torch.Generator().manual_seed(10 + r) for r in range(len(params))]
    draws = []
    for _ in range(4):
        got = sample_rows(logits, params, batched)
        expected = torch.cat([sample_next_token(logits[r:r + 1], p, g) for r, (p, g) in enumerate(zip(params, alone))])
        assert torch.equal(got, expected)
        draws.append(got)
    assert got[2] == logits[2].argmax()  # top_k = 1 is greedy
    assert len({tuple(d.tolist()) for d in draws}) > 1  # the generators advance
