"""The teacher-forced training forward against the OFFICIAL code's training forward (fixtures/reference_tiny_train).

The fixture (see its README) holds the official batch (two rows, the second one padded inside its prompt and at its
end), the official codebook-0 and depth-decoder logits, the two official losses and gradients. The official model
never adds its two losses; ours reports both (`backbone_loss`, `depth_loss`) and trains on
`(1 - w) * backbone_loss + w * depth_loss` with every `loss_stride`-th frame in the depth loss, the backbone state
detached there (so only the depth decoder's own parameters get that loss's gradient).

Compared: logits and gradient arrays (the loss of a near-uniform random model barely moves under a position or mask
bug), losses and gradient norms, with the fixture's suggested tolerances.
"""

import json

import numpy as np
import pytest
import torch

from conftest import FIXTURES, reference

TRAIN = FIXTURES / "reference_tiny_train"


def load(name):
    return torch.from_numpy(np.load(TRAIN / f"{name}.npy"))


@pytest.fixture(scope="module")
def official():
    result = json.loads((TRAIN / "result.json").read_text())
    return {"scalars": result["scalars"], "norms": result["scalars"]["grad_norms"]}


def fresh_model(**config):
    """The reference checkpoint, loaded anew (gradients are taken), every frame in the depth loss."""
    from openchroma import ChromaForConditionalGeneration

    return ChromaForConditionalGeneration.from_pretrained(
        reference("reference_tiny").checkpoint, dtype=torch.float32, loss_stride=1, **config).train()


def batch_inputs(model):
    """The official batch; answer and prompt frames rebuilt in-graph from the audio table (as the official
    gradients were taken), text, zero and thinker positions taken as given."""
    embeds, mask = load("inputs/input_embeddings"), load("inputs/attention_mask")
    codes = load("inputs/frame_codes")  # [2, 60, 8], -1 where no frame
    is_frame = codes[..., 0] >= 0
    frames = model.embed_frames(codes.clamp(min=0))  # [2, 60, D]
    torch.testing.assert_close(frames[is_frame].detach(), embeds[is_frame], atol=1e-5, rtol=0)
    embeds = torch.where(is_frame[..., None], frames, embeds)
    labels = load("inputs/labels_full")  # [2, 60, 8]: all codes at answer-frame positions, -100 elsewhere
    positions = torch.arange(embeds.shape[1]).expand(embeds.shape[0], -1)  # the official code counts every slot
    return embeds, mask, labels, positions


def grad_norm(param):
    return float(param.grad.double().norm()) if param.grad is not None else None


def test_backbone_logits_loss_and_gradients_equal_the_official_training_forward(official):
    model = fresh_model()
    embeds, mask, labels, positions = batch_inputs(model)
    embeds.retain_grad()
    out = model(inputs_embeds=embeds, labels=labels, attention_mask=mask, position_ids=positions)
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], load("expected/c0_logits")[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.last_hidden_state[valid], load("expected/backbone_last_hidden")[valid],
                               atol=1e-5, rtol=0)
    assert abs(out.backbone_loss.item() - official["scalars"]["backbone_loss"]) <= 2e-6
    out.backbone_loss.backward()
    torch.testing.assert_close(embeds.grad, load("expected/grad_input_embeddings__backbone_loss"), atol=1e-6, rtol=0)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, expected in official["norms"]["backbone_loss"].items():
        if expected is None:
            assert params[name].grad is None or not params[name].grad.any(), name
        else:
            assert grad_norm(params[name]) == pytest.approx(expected, rel=1e-5), name


def test_depth_logits_loss_and_gradients_equal_the_official_decoder_forward(official):
    model = fresh_model()
    embeds, mask, labels, positions = batch_inputs(model)
    out = model(inputs_embeds=embeds, labels=labels, attention_mask=mask, position_ids=positions)
    frame_valid = load("inputs/frame_pos") >= 0  # [2, 16]
    expected_logits = load("expected/decoder_logits")[frame_valid]  # [26, 7, V], row 0's frames then row 1's
    torch.testing.assert_close(out.depth_logits, expected_logits, atol=1e-5, rtol=0)
    assert abs(out.depth_loss.item() - official["scalars"]["decoder_loss"]) <= 2e-6
    w = model.config.decoder_loss_weight
    torch.testing.assert_close(out.loss, (1 - w) * out.backbone_loss + w * out.depth_loss)

    # gradients of the depth loss: w.r.t. the backbone state it reads (slot 0 of the official decoder input) and
    # the depth decoder's own parameters
    model.zero_grad(set_to_none=True)
    decoder_inputs = load("inputs/decoder_inputs_embeds")[frame_valid]  # [26, 9, D]
    states = decoder_inputs[:, 0].clone().requires_grad_()
    frames = load("inputs/target_codes")[frame_valid]  # [26, 8]
    depth_logits = model.depth_teacher_forced(states, frames)
    loss = torch.nn.functional.cross_entropy(depth_logits.reshape(-1, depth_logits.shape[-1]),
                                             frames[:, 1:].reshape(-1))
    assert abs(loss.item() - official["scalars"]["decoder_loss"]) <= 2e-6
    loss.backward()
    expected_grad = load("expected/grad_decoder_inputs_embeds__decoder_loss")[frame_valid][:, 0]
    torch.testing.assert_close(states.grad, expected_grad, atol=1e-6, rtol=0)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in ("decoder.projection.weight", "decoder.model.layers.0.self_attn.q_proj.weight",
                 "decoder.codebook_head.weight"):
        assert grad_norm(params[name]) == pytest.approx(official["norms"]["decoder_loss"][name], rel=1e-5), name


def test_default_positions_count_real_tokens_only():
    """Without position_ids our forward numbers real tokens only (what generation does; the official training
    forward counts padding slots too): equal to the official logits wherever no padding precedes."""
    model = fresh_model()
    embeds, mask, labels, _ = batch_inputs(model)
    out = model(inputs_embeds=embeds, attention_mask=mask)
    expected = load("expected/c0_logits")
    torch.testing.assert_close(out.logits[0], expected[0], atol=1e-5, rtol=0)  # row 0 has no padding
    first_pad = int((mask[1] == 0).nonzero()[0])
    torch.testing.assert_close(out.logits[1, :first_pad], expected[1, :first_pad], atol=1e-5, rtol=0)
    later = mask[1].bool() & (torch.arange(mask.shape[1]) > first_pad)
    assert (out.logits[1][later] - expected[1][later]).abs().max() > 1e-4  # shifted positions, as designed
