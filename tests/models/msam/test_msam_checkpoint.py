"""SAM-Med3D state dicts in and out."""

from __future__ import annotations

import pytest
import torch
from msam_helpers import blob_batch, make_net

from sautomed.models.msam.checkpoint import export_sam_med3d, load_sam_med3d, msam_state_dict
from sautomed.models.sam.checkpoint import SamCheckpointError


def _outputs(net, image):
    points = (torch.tensor([[[9, 10, 11]]]), torch.tensor([[1]]))
    with torch.no_grad():
        return net(image, points, torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3)))


def _trained_lora(net):
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # as if trained: LoRA now changes the encoder
    return net


def test_sam_med3d_round_trip_merges_lora():
    src = _trained_lora(make_net(seed=0, fusion="sum"))
    sd = export_sam_med3d(src)
    assert all(k.split(".")[0] in ("image_encoder", "prompt_encoder", "mask_decoder") for k in sd)
    assert not any("lora_" in k for k in sd)
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in sd
    assert sd["image_encoder.pos_embed"].shape == (1, 4, 4, 4, 48)
    dst = make_net(seed=1, fusion="sum")  # fresh LoRA (B = 0): the merged weights carry all of it
    report = load_sam_med3d(dst, sd)
    assert all(".lora_" in k for k in report.missing)
    image, _ = blob_batch(1)
    assert torch.allclose(_outputs(src, image), _outputs(dst, image), atol=1e-5)


def test_msam_state_dict_round_trip_with_the_mea(tmp_path):
    src = _trained_lora(make_net(seed=0, fusion="mea"))
    torch.save({"model_state_dict": msam_state_dict(src)}, tmp_path / "msam.pth")
    dst = make_net(seed=1, fusion="mea")
    load_sam_med3d(dst, tmp_path / "msam.pth")
    image, _ = blob_batch(1)
    assert torch.allclose(_outputs(src, image), _outputs(dst, image), atol=1e-6)


def test_other_crop_size_interpolates_positions():
    sd = export_sam_med3d(make_net(fusion="sum"))  # 32^3: 4^3 tokens
    big = make_net(fusion="sum", image_size=48)  # 6^3 tokens
    report = load_sam_med3d(big, sd)
    assert report.interpolated["image_encoder.pos_embed"] == ((1, 4, 4, 4, 48), (1, 6, 6, 6, 48))
    assert "image_encoder.blocks.1.attn.rel_pos_d" in report.interpolated  # the global block
    assert "image_encoder.blocks.0.attn.rel_pos_d" not in report.interpolated  # windowed: unchanged
    assert torch.isfinite(big(torch.rand(1, 1, 48, 48, 48))).all()


def test_foreign_keys_are_refused():
    sd = export_sam_med3d(make_net(fusion="sum"))
    sd["image_encoder.something_else"] = torch.zeros(1)
    with pytest.raises(SamCheckpointError, match="unexpected"):
        load_sam_med3d(make_net(fusion="sum"), sd)
    sd.pop("image_encoder.something_else")
    sd.pop("mask_decoder.iou_token.weight")
    with pytest.raises(SamCheckpointError, match="missing"):
        load_sam_med3d(make_net(fusion="sum"), sd)
