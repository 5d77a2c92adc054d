"""The fast path equals the readable reference path (issue 5)."""

import pytest
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


def test_static_shape_step_equals_eager_step():
    """The fixed-shape one-frame step (what compile=True compiles: whole-cache attention with a mask, slot indices as
    a tensor), run eagerly, reproduces the reference loop on a padded batch with a thinker stop."""
    ref = reference("reference_tiny_stop")
    model = ref.model()
    inputs = batch_of([ref.inputs, variant_inputs(ref, seed=7)])
    static = ChromaGenerator(model)
    static.compiled_frame_step = static.frame_step  # the static path without the compiler
    fast = run(static, inputs, 14)
    reference_out = run(ChromaGenerator(model, static_thinker=False), inputs, 14)
    assert torch.equal(fast.sequences, reference_out.sequences)
    assert torch.equal(fast.text_sequences, reference_out.text_sequences)
    for a, b in zip(fast.logits, reference_out.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_step_equals_eager_on_cpu():
    """torch.compile of the one-frame step (inductor on CPU here; CUDA graphs on a GPU) gives the same codes.
    Slow (compilation takes minutes on 2 cores): run with `pytest tests -m slow`."""
    ref = reference("reference_tiny")
    model = ref.model()
    compiled = run(ChromaGenerator(model, compile=True), ref.inputs, ref.num_frames)
    assert compiled.sequences[0].tolist() == ref.expected["gen_codes"].tolist()


@pytest.mark.gpu
def test_compiled_step_equals_eager_on_cuda():
    """The CUDA-graph path (reduce-overhead) against the eager loop, float32 on a GPU: run with `pytest tests -m gpu`."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ref = reference("reference_tiny")
    model = ref.model().to("cuda")
    inputs = {k: v.to("cuda") for k, v in ref.inputs.items()}
    eager = run(ChromaGenerator(model), inputs, ref.num_frames)
    compiled = run(ChromaGenerator(model, compile=True), inputs, ref.num_frames)
    assert torch.equal(eager.sequences.cpu(), compiled.sequences.cpu())
    model.to("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 24, 64, 65])
def test_few_rows_linear_equals_linear(rows, dtype):
    """The few-rows route of the decode linears (W @ x^T on the CPU) is F.linear, with and without bias, for row
    counts on both sides of its threshold; gradients flow through it the same way."""
    from openchroma.modeling_chroma import FEW_ROWS_MAX, apply_linear, few_rows_linear

    assert 24 < FEW_ROWS_MAX < 65
    g = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(48, 80, bias=True).to(dtype)
    x = torch.randn(rows, 1, 48, generator=g).to(dtype).requires_grad_()
    out = apply_linear(x, layer)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert out.shape == (rows, 1, 80) and out.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(few_rows_linear(x, layer.weight), expected - layer.bias, atol=tol, rtol=tol)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad, atol=tol, rtol=tol)
