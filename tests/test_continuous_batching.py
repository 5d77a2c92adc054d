"""Rows joining and leaving a running batch (batching_chroma.merge_states / select_rows): every row's answer is
exactly its solo answer, whenever it joined and whoever it shared steps with."""

import pytest
import torch

from conftest import reference
from openchroma import ChromaGenerator
from openchroma.batching_chroma import merge_states, select_rows
from test_generation import variant_inputs

FRAMES = 9


class RowFrameLimit:
    """Stop each row after FRAMES of its own frames (what max_new_tokens does for a solo run)."""

    def __call__(self, state):
        return state.row_frames >= FRAMES


class Collector:
    """Per request: the codes and text ids it was given, up to and including the chunk that finished it."""

    def __init__(self):
        self.codes, self.text, self.done = {}, {}, set()

    def take(self, runner, state, names):
        chunk = runner.take_chunk(state)
        for b, name in enumerate(names):
            if name in self.done:
                continue
            self.codes.setdefault(name, []).append(chunk.audio_codes[b][chunk.audio_valid[b]])
            self.text.setdefault(name, []).append(chunk.text_ids[b])
            if bool(chunk.finished[b]):
                self.done.add(name)

    def result(self, name):
        return torch.cat(self.codes[name]), torch.cat(self.text[name])


def solo(model, inputs, forced=None):
    runner = ChromaGenerator(model)
    checked = model.prepare_generation_inputs(**inputs, forced_text_ids=forced)
    out = runner.finalize(runner.generate(checked, FRAMES))
    return out.sequences[0, : out.audio_lengths[0]], out.text_sequences[0, : out.text_lengths[0]]


def started(runner, model, inputs, collector, name, forced=None):
    """A one-row state after its prompt step."""
    checked = model.prepare_generation_inputs(**inputs, forced_text_ids=forced)
    state, embeds, valid = runner.start(checked, FRAMES)
    runner.step(state, [RowFrameLimit()], embeds, valid)
    collector.take(runner, state, [name])
    return state


@pytest.mark.parametrize("ref_name", ["reference_tiny", "reference_tiny_stop"])
def test_rows_joining_and_leaving_a_running_batch_get_their_solo_answers(ref_name):
    ref = reference(ref_name)
    model = ref.model()
    requests = {"a": variant_inputs(ref, seed=1), "b": variant_inputs(ref, seed=2, text_len=9),
                "c": variant_inputs(ref, seed=3, audio_len=30000)}
    forced = {"c": [torch.tensor([11, 12, 13, 14, 15, 16])]}  # c speaks a given text (a /v1/audio/speech row)
    expected = {name: solo(model, inputs, forced.get(name)) for name, inputs in requests.items()}

    runner, got, stop = ChromaGenerator(model), Collector(), [RowFrameLimit()]
    state = started(runner, model, requests["a"], got, "a")
    names = ["a"]
    for _ in range(4):  # a runs alone for a while: 5 frames
        runner.step(state, stop)
        got.take(runner, state, names)
    b = started(runner, model, requests["b"], got, "b")  # 1 frame: same parity as a's 5
    state, names = merge_states([state, b], FRAMES, model.config), names + ["b"]
    runner.step(state, stop)
    got.take(runner, state, names)
    c = started(runner, model, requests["c"], got, "c", forced.get("c"))  # 1 frame vs 6: one step alone first
    runner.step(c, stop)
    got.take(runner, c, ["c"])
    state, names = merge_states([c, state], FRAMES, model.config), ["c"] + names
    while len(got.done) < 3:
        runner.step(state, stop)
        got.take(runner, state, names)
        ended = [i for i, name in enumerate(names) if name in got.done]
        if ended and len(ended) < len(names):  # drop the finished rows; the others go on
            keep = [i for i in range(len(names)) if i not in ended]
            state, names = select_rows(state, keep, model.config), [names[i] for i in keep]
    for name, (codes, text) in expected.items():
        got_codes, got_text = got.result(name)
        assert torch.equal(got_codes, codes), name
        assert torch.equal(got_text, text), name


def test_merge_refuses_states_at_different_points_of_the_text_schedule():
    ref = reference("reference_tiny")
    model = ref.model()
    runner, got = ChromaGenerator(model), Collector()
    a = started(runner, model, ref.inputs, got, "a")
    runner.step(a)
    b = started(runner, model, variant_inputs(ref, seed=4), got, "b")
    with pytest.raises(ValueError, match="text schedule"):
        merge_states([a, b], 4, model.config)
