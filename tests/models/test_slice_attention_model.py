"""Local 3D awareness: inter-/intra-slice attention."""

from __future__ import annotations

import torch

from sautomed.models.sautomed.slice_attention import SliceAttention


def _features(batch: int = 2, dim: int = 256, side: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, dim, side, side, generator=g) for _ in range(4)]


def test_identity_at_init_any_depth():
    f_prev, f_t, f_next, pe = _features()
    for depth in (1, 2):
        torch.manual_seed(0)
        sa = SliceAttention(256, depth=depth)
        assert len(sa.blocks) == depth
        z = sa(f_prev, f_t, f_next, pe[:1])
        assert z.shape == f_t.shape
        assert torch.equal(z, f_t)


def _randomise_outputs(sa: SliceAttention) -> None:
    with torch.no_grad():
        for blk in sa.blocks:
            for proj in (blk.inter_attn.out_proj, blk.intra_attn.out_proj, blk.mlp.lin2):
                proj.weight.normal_(std=0.05)


def test_inter_slice_attention_uses_the_neighbours_at_the_same_position():
    f_prev, f_t, f_next, pe = _features(batch=1)
    torch.manual_seed(0)
    sa = SliceAttention(256, depth=1)
    _randomise_outputs(sa)
    with torch.no_grad():
        sa.blocks[
            0
        ].intra_attn.out_proj.weight.zero_()  # isolate inter-slice attention + MLP (both per position)
        base = sa(f_prev, f_t, f_next, pe[:1])
        moved = f_prev.clone()
        moved[0, :, 1, 2] = torch.randn(256)  # change the previous slice at one position only
        out = sa(moved, f_t, f_next, pe[:1])
    changed = (out - base).abs().amax(dim=1)[0]  # (h, w)
    assert changed[1, 2] > 1e-4
    changed[1, 2] = 0
    assert changed.max() == 0  # positions do not mix without intra-slice attention


def test_intra_slice_attention_mixes_positions_and_gradients_flow():
    f_prev, f_t, f_next, pe = _features(batch=2)
    torch.manual_seed(0)
    sa = SliceAttention(256, depth=1)
    _randomise_outputs(sa)
    f_t = f_t.requires_grad_(True)
    z = sa(f_prev, f_t, f_next, pe[:1])
    z[:, :, 0, 0].sum().backward()
    assert (f_t.grad[:, :, 3, 3].abs().sum() > 0) and torch.isfinite(z).all()
    assert all(p.grad is not None for p in sa.parameters())
