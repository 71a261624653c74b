"""segment-anything loading, LoRA, and official-checkpoint loading with interpolation."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from model_helpers import S, make_net

from sautomed.models.sam.build import PIXEL_MEAN, PIXEL_STD, build_sam_parts
from sautomed.models.sam.checkpoint import SamCheckpointError
from sautomed.models.sam.upstream import Sam, sam_model_registry


def _run(code: str) -> str:
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_upstream_loads_without_torchvision():
    out = _run(
        """
        import sys
        sys.modules["torchvision"] = None  # any `import torchvision` raises ImportError
        from sautomed.models.sam import upstream
        assert "segment_anything" not in sys.modules  # no stand-in left behind
        enc = upstream.ImageEncoderViT(img_size=32, embed_dim=16, depth=1, num_heads=2, out_chans=8)
        print("ok", type(enc).__module__, sorted(upstream.sam_model_registry))
        """
    )
    assert "ok segment_anything.modeling.image_encoder" in out


def test_upstream_reuses_a_properly_imported_segment_anything():
    # a stand-in torchvision so that segment_anything's own __init__ (predictor, mask generator) imports
    out = _run(
        """
        import sys, types
        def mod(name, **attrs):
            m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m; return m
        mod("torchvision"); mod("torchvision.transforms"); mod("torchvision.ops")
        mod("torchvision.transforms.functional", resize=None, to_pil_image=None)
        mod("torchvision.ops.boxes", batched_nms=None, box_area=None)
        import segment_anything
        from sautomed.models.sam import upstream
        assert upstream.ImageEncoderViT is segment_anything.modeling.ImageEncoderViT
        assert upstream.sam_model_registry is segment_anything.sam_model_registry
        assert hasattr(sys.modules["segment_anything"], "SamPredictor")
        print("ok")
        """
    )
    assert "ok" in out


def test_lora_encoder_at_init_equals_segment_anything_encoder():
    net = make_net(lora_rank=4)
    sam_encoder = build_sam_parts("tiny", S).image_encoder
    own = {k: v for k, v in net.image_encoder.state_dict().items() if "lora_" not in k}
    sam_encoder.load_state_dict(own)  # strict: the LoRA swap kept SAM's key names
    x = torch.rand(2, S, S)
    rgb = (x[:, None].expand(-1, 3, -1, -1) * 255 - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        PIXEL_STD
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        ours, ref = net.encode(x), sam_encoder(rgb)
        assert torch.allclose(ours, ref, atol=1e-5)
        # LoRA is live: a non-zero B changes the output; eval() must not merge LoRA into the saved weight
        qkv = net.image_encoder.blocks[0].attn.qkv
        qkv.lora_B.normal_()
        w = qkv.weight.clone()
        net.eval()
        assert torch.equal(qkv.weight, w)
        assert not torch.allclose(net.encode(x), ref, atol=1e-4)
    net.train()


def test_lora_layers_and_frozen_encoder():
    net = make_net(lora_rank=4, lora_alpha=8.0)
    for blk in net.image_encoder.blocks:
        qkv = blk.attn.qkv
        assert qkv.r == 4 and qkv.scaling == 2.0 and qkv.enable_lora == [True, False, True]
    for name, p in net.image_encoder.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    keys = net.state_dict().keys()
    assert (
        "image_encoder.blocks.0.attn.qkv.weight" in keys and "image_encoder.blocks.0.attn.qkv.lora_A" in keys
    )
    full = make_net(encoder_finetune="full")
    assert all(p.requires_grad for p in full.image_encoder.parameters())


def _official_state_dict(backbone: str, image_size: int) -> dict[str, torch.Tensor]:
    """A checkpoint in the official layout, from segment-anything's own Sam class (random weights)."""
    torch.manual_seed(3)
    parts = build_sam_parts(backbone, image_size)
    sam = Sam(parts.image_encoder, parts.prompt_encoder, parts.mask_decoder)
    for p in sam.parameters():  # SAM zero-inits pos_embed / rel_pos: make every tensor distinguishable
        torch.nn.init.normal_(p, std=0.02)
    return sam.state_dict()


def test_checkpoint_load_report_and_class_token_init(tmp_path):
    sd = _official_state_dict("tiny", S)
    path = tmp_path / "sam_tiny.pth"
    torch.save(sd, path)
    net = make_net(sam_checkpoint=str(path))
    report = net.load_report
    assert report is not None and not report.interpolated
    own = net.state_dict()
    for k in report.loaded:
        assert torch.equal(own[k], sd[k]), k
    assert all(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in report.loaded)
    # missing: only new modules (LoRA, slice attention, history, box prompts, class tokens/MLPs)
    assert report.missing and all(
        "lora_" in k or k.startswith(("slice_attention.", "history.", "box_prompt.", "mask_decoder.class_"))
        for k in report.missing
    )
    assert any(k.startswith("slice_attention.") for k in report.missing)
    # unexpected but known: SAM's IoU head, IoU token, 4 mask tokens and their MLPs
    assert "mask_decoder.iou_token.weight" in report.unexpected
    assert "mask_decoder.mask_tokens.weight" in report.unexpected
    assert any(k.startswith("mask_decoder.iou_prediction_head.") for k in report.unexpected)
    # class tokens from SAM's first mask token, class MLPs from SAM's first hypernetwork MLP
    tokens = own["mask_decoder.class_tokens.weight"]
    assert tokens.shape == (9, 256)
    assert torch.equal(tokens, sd["mask_decoder.mask_tokens.weight"][0].expand(9, -1))
    for i in range(9):
        for k in ("layers.0.weight", "layers.2.bias"):
            assert torch.equal(
                own[f"mask_decoder.class_hypernetworks_mlps.{i}.{k}"],
                sd[f"mask_decoder.output_hypernetworks_mlps.0.{k}"],
            )
    assert "interpolated" in str(report) and "unexpected" in str(report)


def test_checkpoint_interpolates_global_tables_only():
    sd = _official_state_dict("tiny", 2 * S)  # grid 8 -> 4
    net = make_net()
    report = net.load_sam_checkpoint(sd)
    assert report.interpolated == {
        "image_encoder.pos_embed": ((1, 8, 8, 192), (1, 4, 4, 192)),
        "image_encoder.blocks.3.attn.rel_pos_h": ((15, 64), (7, 64)),
        "image_encoder.blocks.3.attn.rel_pos_w": ((15, 64), (7, 64)),
    }
    # windowed blocks (window 8) keep their tables
    assert torch.equal(
        net.image_encoder.blocks[0].attn.rel_pos_h, sd["image_encoder.blocks.0.attn.rel_pos_h"]
    )
    with torch.no_grad():
        assert torch.isfinite(net.encode(torch.rand(1, S, S))).all()


def test_checkpoint_errors_name_the_keys():
    sd = _official_state_dict("tiny", S)
    net = make_net()
    broken = dict(sd)
    del broken["image_encoder.neck.0.weight"]
    del broken["mask_decoder.transformer.layers.0.norm1.bias"]
    with pytest.raises(SamCheckpointError, match="image_encoder.neck.0.weight") as err:
        net.load_sam_checkpoint(broken)
    assert "mask_decoder.transformer.layers.0.norm1.bias" in str(err.value)
    with pytest.raises(SamCheckpointError, match="something.else"):
        net.load_sam_checkpoint({**sd, "something.else": torch.zeros(1)})
    wrong = dict(sd)
    wrong["image_encoder.blocks.0.mlp.lin1.weight"] = torch.zeros(5, 5)
    with pytest.raises(SamCheckpointError, match="image_encoder.blocks.0.mlp.lin1.weight"):
        net.load_sam_checkpoint(wrong)


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()  # segment-anything's own builder, random weights
    with torch.no_grad():  # SAM zero-inits these; make interpolation observable
        sam.image_encoder.pos_embed.normal_(std=0.02)
        for blk in sam.image_encoder.blocks:
            blk.attn.rel_pos_h.normal_(std=0.02)
            blk.attn.rel_pos_w.normal_(std=0.02)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_01ec64.pth"
    torch.save(sam.state_dict(), path)
    return path


@pytest.mark.parametrize("size", [1024, 256, 512])
def test_official_vit_b_checkpoint(vit_b_checkpoint, size):
    from sautomed.models.sautomed.network import NetworkConfig, SAutoMedNet

    sd = torch.load(vit_b_checkpoint, map_location="cpu", weights_only=True)
    cfg = NetworkConfig(
        backbone="vit_b", image_size=size, num_classes=2, sam_checkpoint=str(vit_b_checkpoint)
    )
    net = SAutoMedNet(cfg)
    report = net.load_report
    g = size // 16
    if size == 1024:
        assert report.interpolated == {}
    else:
        expected = {"image_encoder.pos_embed": ((1, 64, 64, 768), (1, g, g, 768))}
        for i in (2, 5, 8, 11):  # the global-attention blocks of vit_b
            for a in "hw":
                expected[f"image_encoder.blocks.{i}.attn.rel_pos_{a}"] = ((127, 64), (2 * g - 1, 64))
        assert report.interpolated == expected
    own = net.state_dict()
    for k in report.loaded:
        if k not in report.interpolated:
            assert torch.equal(own[k], sd[k]), k
    assert torch.equal(
        own["image_encoder.blocks.0.attn.rel_pos_h"], sd["image_encoder.blocks.0.attn.rel_pos_h"]
    )
    assert set(report.unexpected) == {
        k
        for k in sd
        if k.startswith(("mask_decoder.iou", "mask_decoder.mask_tokens", "mask_decoder.output_hyper"))
    }
