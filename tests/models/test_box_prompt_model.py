"""Box prompt generator: anchors, refinement, SAM prompt tokens."""

from __future__ import annotations

import torch
from model_helpers import C, S

from sautomed.models.sam.build import build_sam_parts
from sautomed.models.sautomed.box_prompt import BoxPromptGenerator, inverse_sigmoid, sine_embed


def _generator() -> BoxPromptGenerator:
    torch.manual_seed(0)
    return BoxPromptGenerator(C, dim=256, num_layers=3)


def test_anchors_previous_boxes_or_default():
    gen = _generator()
    with torch.no_grad():
        gen.default_anchor_logits.copy_(inverse_sigmoid(torch.rand(C, 4) * 0.5 + 0.25))
    prev = torch.rand(2, C, 4) * 0.5 + 0.2
    present = torch.zeros(2, C, dtype=torch.bool)
    present[0, [1, 4]] = True
    present[1, 0] = True
    anchors = gen.anchors(prev, present)
    default = gen.default_anchors()
    for b in range(2):
        for c in range(C):
            expected = prev[b, c] if present[b, c] else default[c]
            assert torch.allclose(anchors[b, c], expected)


def test_generator_refines_from_its_anchors():
    gen = _generator()
    z, pe = torch.randn(2, 256, 4, 4), torch.randn(1, 256, 4, 4)
    prev = torch.rand(2, C, 4) * 0.5 + 0.2
    present = torch.zeros(2, C, dtype=torch.bool)
    present[0, 2] = True
    boxes, presence, feats = gen(z, pe, prev, present)
    assert boxes.shape == (2, C, 4) and presence.shape == (2, C) and feats.shape == (2, C, 256)
    assert ((boxes > 0) & (boxes < 1)).all()
    # the box head's last layer starts at zero: untrained, every layer keeps its anchor
    assert torch.allclose(boxes, gen.anchors(prev, present), atol=1e-4)
    # the previous box is used when given: moving it moves the output for that class only
    prev2 = prev.clone()
    prev2[0, 2] = torch.tensor([0.7, 0.3, 0.2, 0.1])
    boxes2, _, _ = gen(z, pe, prev2, present)
    assert torch.allclose(boxes2[0, 2], prev2[0, 2], atol=1e-4)
    assert torch.allclose(boxes2[1], boxes[1], atol=1e-5)
    # absent classes' boxes do not depend on the (meaningless) previous boxes
    prev3 = prev.clone()
    prev3[0, 5] = 0.9
    boxes3, _, _ = gen(z, pe, prev3, present)
    assert torch.allclose(boxes3[0, 5], boxes[0, 5], atol=1e-6)


def test_prompt_tokens_are_sam_box_embeddings_plus_query_projection():
    gen = _generator()
    prompt_encoder = build_sam_parts("tiny", S).prompt_encoder
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.25]] * C])  # (1, C, 4)
    feats = torch.randn(1, C, 256)
    tokens = gen.prompt_tokens(prompt_encoder, boxes, feats)
    assert tokens.shape == (1, 2 * C, 256)
    # class 0: cx 0.5, w 0.5 -> x from 16 to 48 (edges) -> SAM pixel box (16, 24, 47, 39) at S = 64
    sam_box = torch.tensor([[16.0, 24.0, 47.0, 39.0]])
    corners = prompt_encoder._embed_boxes(sam_box)  # (1, 2, 256)
    proj = gen.feature_proj(feats[0, 0]).view(2, 256)
    assert torch.allclose(tokens[0, :2], corners[0] + proj, atol=1e-5)


def test_sine_embedding_shape():
    e = sine_embed(torch.rand(3, C, 4), 128)
    assert e.shape == (3, C, 512) and e.abs().max() <= 1
