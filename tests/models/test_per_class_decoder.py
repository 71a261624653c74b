"""The per-class decoder (``network.decoder: per_class``): SAM's own single-mask box path once per class."""

from __future__ import annotations

import torch
from model_helpers import C, S, make_net, phantom_images, phantom_labels

from sautomed.models.sam.build import build_sam_parts
from sautomed.models.sautomed.decoder import PerClassMaskDecoder
from sautomed.models.sautomed.loss import LossWeights, SAutoMedLoss


def test_per_class_decoder_is_sams_single_mask_path_for_each_class_box():
    """With zero class embeddings and no history, class c's logits are SAM's multimask_output=False logits
    for class c's box: whatever SAM's weights (random here, pretrained in use), they are used as trained."""
    torch.manual_seed(0)
    parts = build_sam_parts("tiny", S, 16, 1)
    for p in parts.mask_decoder.parameters():  # non-trivial weights everywhere
        torch.nn.init.normal_(p, std=0.2)
    dec = PerClassMaskDecoder(parts.mask_decoder, num_classes=3).eval()
    pe_enc = parts.prompt_encoder
    B, h = 2, S // 16
    feats = torch.randn(B, 256, h, h)
    boxes = torch.tensor([[[2.0, 3, 30, 40], [10, 10, 20, 20], [0, 0, 63, 63]]] * B)  # (B, 3, 4) xyxy
    boxes[1] += 5
    corners = pe_enc._embed_boxes(boxes.reshape(-1, 4)).view(B, 3 * 2, 256)
    pe = pe_enc.get_dense_pe()
    dense = pe_enc.no_mask_embed.weight.reshape(1, -1, 1, 1)
    with torch.no_grad():
        logits, hist = dec(feats, pe, dense, None, corners)
        assert hist is None and logits.shape == (B, 4, 4 * h, 4 * h)
        assert torch.equal(logits[:, 0], torch.zeros_like(logits[:, 0]))  # background: the constant 0
        for b in range(B):
            for c in range(3):
                sparse, dense_c = pe_enc(points=None, boxes=boxes[b, c][None, None], masks=None)
                ref, _ = parts.mask_decoder(feats[b : b + 1], pe, sparse, dense_c, multimask_output=False)
                torch.testing.assert_close(logits[b, 1 + c], ref[0, 0], rtol=1e-4, atol=1e-4)


def test_per_class_network_trains_every_trainable_part_and_keeps_history_per_class():
    net = make_net(decoder="per_class", encoder_finetune="full", lora_rank=0)
    labels = torch.stack([phantom_labels(2, S, shift=z) for z in range(3)], dim=1)  # (2, 3, S, S)
    f = net.encode(phantom_images(labels).flatten(0, 1)).view(2, 3, 256, S // 16, S // 16)
    state = net.initial_state(2)
    assert state.history.shape == (2, C, net.cfg.history_tokens, 256)
    out = net.step(f[:, 0], f[:, 1], f[:, 2], state)
    assert out.logits.shape == (2, C + 1, S // 4, S // 4)
    assert out.state.history.shape == (2, C, net.cfg.history_tokens, 256)
    second = net.step(f[:, 1], f[:, 2], f[:, 2], out.state)  # the history filter acts between slices
    crit = SAutoMedLoss(LossWeights(), C)
    (crit(out, labels[:, 1])["loss"] + crit(second, labels[:, 2])["loss"]).backward()
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert any(n.startswith("mask_decoder.iou_prediction_head.") for n in frozen)
    assert "mask_decoder.output_hypernetworks_mlps.1.layers.0.weight" in frozen
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    # presence gates the class logits: a class the generator calls absent loses its pixels
    with torch.no_grad():
        net.box_prompt.presence_head.bias.fill_(-30.0)
        gated = net.step(f[:, 0], f[:, 1], f[:, 2], state)
    assert (gated.logits.argmax(1) == 0).all()


def test_a_frozen_sam_decoder_keeps_its_weights_and_the_new_parts_train():
    net = make_net(decoder="per_class", encoder_finetune="full", lora_rank=0, sam_decoder_finetune="frozen")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert "mask_decoder.class_embed.weight" in trainable
    assert any(n.startswith("box_prompt.") for n in trainable)
    assert any(n.startswith("history.") for n in trainable)
    assert not any(n.startswith("prompt_encoder.") for n in trainable)
    sam_parts = [n for n, _ in net.mask_decoder.named_parameters() if not n.startswith("class_embed")]
    assert sam_parts and not any(f"mask_decoder.{n}" in trainable for n in sam_parts)


def test_a_frozen_sam_decoder_without_a_checkpoint_is_refused():
    import pytest
    from model_helpers import tiny_config

    from sautomed.models.sautomed.module import SAutoMedModule
    from sautomed.run_folder import UserError

    cfg = tiny_config(
        encoder_finetune="full", lora_rank=0, decoder="per_class", sam_decoder_finetune="frozen"
    )
    with pytest.raises(UserError, match="sam_decoder_finetune"):
        SAutoMedModule(network=cfg)


def test_prompts_context_feeds_sams_decoder_its_own_input_and_the_3d_parts_to_the_generator():
    """context: prompts -- the decoder sees f_t and SAM's own box embedding of the generated boxes; the slice
    attention and the history reach only the box prompt generator (and through its boxes, the masks)."""
    net = make_net(decoder="per_class", context="prompts", encoder_finetune="full", lora_rank=0).eval()
    for p in net.slice_attention.parameters():  # a slice attention that is not the identity
        torch.nn.init.normal_(p, std=0.05)
    labels = torch.stack([phantom_labels(2, S, shift=z) for z in range(3)], dim=1)
    f = net.encode(phantom_images(labels).flatten(0, 1)).view(2, 3, 256, S // 16, S // 16)
    state = net.initial_state(2)
    assert state.history.shape == (2, net.cfg.history_tokens, 256)  # one history per chain
    with torch.no_grad():
        out = net.step(f[:, 0], f[:, 1], f[:, 2], state)
        pe = net.prompt_encoder.get_dense_pe()
        corners = net.box_prompt.prompt_tokens(net.prompt_encoder, out.boxes, None)
        dense = net.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        sam, _ = net.mask_decoder(f[:, 1], pe, dense, None, corners)
        gate = torch.nn.functional.logsigmoid(out.presence)[:, :, None, None]
        torch.testing.assert_close(out.logits[:, 1:], sam[:, 1:] + gate)
        other = net.step(f[:, 2], f[:, 1], f[:, 0], state)  # other neighbours: another presence
        assert not torch.allclose(other.presence, out.presence)
    net.train()
    o1 = net.step(f[:, 0], f[:, 1], f[:, 2], state)
    o2 = net.step(f[:, 1], f[:, 2], f[:, 2], o1.state)
    crit = SAutoMedLoss(LossWeights(), C)
    (crit(o1, labels[:, 1])["loss"] + crit(o2, labels[:, 2])["loss"]).backward()
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert "mask_decoder.class_embed.weight" in frozen and "box_prompt.feature_proj.weight" in frozen
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
