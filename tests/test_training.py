"""The teacher-forced training forward: the official loss (SPEC §6) and where its gradients go."""

import torch
import torch.nn.functional as F

from conftest import tiny_model


def training_batch(model, seed=0):
    """Two rows of backbone inputs; audio frames with labels at some positions, -100 elsewhere, row 1 padded."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    batch, length, k = 2, 21, config.audio_num_codebooks
    embeds = torch.randn(batch, length, config.backbone_config.hidden_size, generator=g)
    labels = torch.full((batch, length, k), -100, dtype=torch.long)
    labels[:, 6:] = torch.randint(0, config.codebook_size, (batch, length - 6, k), generator=g)
    labels[:, 9] = -100  # a text (thinker) slot inside the audio part
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 17:] = 0
    labels[1, 17:] = -100
    return embeds, labels, mask


def reference_loss(model, embeds, labels, mask):
    """SPEC §6 written out loop by loop, independently of the model's vectorised forward."""
    config = model.config
    out = model(inputs_embeds=embeds, attention_mask=mask)
    logits, hidden = out.logits, out.last_hidden_state
    ce_terms, depth_rows = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = labels[b, t + 1]
            if target[0] != -100:
                ce_terms.append(F.cross_entropy(logits[b, t].float()[None], target[:1], reduction="sum"))
                depth_rows.append((hidden[b, t].detach(), target))
    backbone = torch.stack(ce_terms).sum() / len(ce_terms)
    depth_terms = []
    for state, frame in depth_rows[:: config.loss_stride]:
        logits_k = model.depth_teacher_forced(state[None], frame[None])[0]  # [K-1, V]
        depth_terms.append(F.cross_entropy(logits_k.float(), frame[1:], reduction="none"))
    depth = torch.cat(depth_terms).mean()
    w = config.decoder_loss_weight
    return (1 - w) * backbone + w * depth, backbone, depth


def test_loss_equals_official_definition():
    for stride in (1, 4, 16):
        model = tiny_model(loss_stride=stride)
        embeds, labels, mask = training_batch(model)
        out = model(inputs_embeds=embeds, labels=labels, attention_mask=mask)
        total, backbone, depth = reference_loss(model, embeds, labels, mask)
        torch.testing.assert_close(out.backbone_loss, backbone)
        torch.testing.assert_close(out.depth_loss, depth)
        torch.testing.assert_close(out.loss, total)
        assert out.logits.shape == (2, 21, model.config.backbone_config.vocab_size)


def test_depth_training_positions_are_zero_to_k_minus_one():
    """Training uses depth positions 0..7 (the official training forward), unlike inference's [0, 0, 1, ..., 6]."""
    model = tiny_model()
    state = torch.randn(1, model.config.backbone_config.hidden_size)
    frame = torch.randint(0, 2048, (1, 8))
    logits = model.depth_teacher_forced(state, frame)
    inputs = torch.cat([state[:, None], model.decoder.audio_embedding(frame[:, :7])], dim=1)
    hidden = model.decoder(inputs, torch.arange(8)[None])
    for k in range(1, 8):
        torch.testing.assert_close(logits[0, k - 1], model.decoder.codebook_logits(hidden[0, k], k))


def test_gradients_reach_every_backbone_and_depth_parameter():
    model = tiny_model(loss_stride=1).train()
    embeds, labels, mask = training_batch(model)
    model(inputs_embeds=embeds, labels=labels, attention_mask=mask).loss.backward()
    for prefix in ("backbone.", "decoder."):
        for name, param in model.named_parameters():
            if name.startswith(prefix) and param.requires_grad:
                assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_depth_loss_does_not_reach_the_backbone():
    """The backbone state is detached before the depth decoder (official training)."""
    model = tiny_model(loss_stride=1).train()
    embeds, labels, mask = training_batch(model)
    model(inputs_embeds=embeds, labels=labels, attention_mask=mask).depth_loss.backward()
    assert model.backbone.codebook0_head.weight.grad is None
    assert all(p.grad is None for p in model.backbone.model.parameters())
    assert model.decoder.projection.weight.grad is not None
