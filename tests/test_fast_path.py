"""The fast path equals the readable reference path (issue 5)."""

import torch

from conftest import reference
from openchroma import ChromaGenerator
from test_generation import ScriptedEOS, batch_of, variant_inputs


def run(runner, inputs, frames, **kwargs):
    return runner.finalize(runner.generate(inputs, frames, **kwargs))


def test_static_thinker_steps_equal_transformers_forward():
    """Text steps on our preallocated thinker cache == the transformers thinker forward, in a batch where one row's
    thinker stops before the other's (codes and text identical, logits within float noise)."""
    ref = reference("reference_tiny_stop")
    model = ref.model()
    inputs = batch_of([ref.inputs, variant_inputs(ref, seed=7)])
    fast = run(ChromaGenerator(model), inputs, 14)
    slow = run(ChromaGenerator(model, static_thinker=False), inputs, 14)
    assert torch.equal(fast.sequences, slow.sequences)
    assert torch.equal(fast.text_sequences, slow.text_sequences)
    assert fast.text_lengths.tolist() != [1, 1]
    for a, b in zip(fast.logits, slow.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_fewer_host_syncs_same_output():
    """Checking for the end of all rows only every few frames changes nothing but speed."""
    ref = reference("reference_tiny")
    model = ref.model()
    inputs = batch_of([ref.inputs, variant_inputs(ref, seed=5)])
    script = {(0, 2): 17, (1, 4): 0}
    every_frame = ScriptedEOS(model, script)
    baseline = every_frame.finalize(every_frame.generate(inputs, 12, sync_every=1))
    for sync_every in (3, 8):
        runner = ScriptedEOS(model, script)
        state = runner.generate(inputs, 12, sync_every=sync_every)
        out = runner.finalize(state)
        assert torch.equal(out.sequences, baseline.sequences)
        assert out.audio_lengths.tolist() == baseline.audio_lengths.tolist() == [3, 4]
        assert len(state.frames) == min(12, -(-5 // sync_every) * sync_every)  # stops at the first check after
