"""The public M-SAM checkpoint's names (MEA and LoRA) and the relative-position broadcasting modes.

Verified once against the upstream modules themselves (SAM-Med3D's ``image_encoder3D``/``prompt_encoder3D``/
``mask_decoder3D`` and M-SAM's ``mea.py``, same weights): identical outputs (max abs diff 0 and 6e-6).
These tests pin the name mapping and the formulas without the upstream code.
"""

from __future__ import annotations

import itertools

import torch
from msam_helpers import blob_batch, make_net

from sautomed.models.msam.checkpoint import load_sam_med3d, public_mea_key
from sautomed.models.msam.encoder3d import add_decomposed_rel_pos_3d


def _public_attention(prefix: str) -> list[str]:
    names = [f"{prefix}{m}.{p}" for m in ("qkv", "proj", "norm1", "norm2") for p in ("weight", "bias")]
    names += [f"{prefix}mlp.lin{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
    return names + [f"{prefix}rel_pos_{a}" for a in "dhw"]


def _public_mea_keys(blocks: int) -> list[str]:
    wb = ("weight", "bias")
    keys = [f"add_norm{s}.{p}" for s in ("", "2", "3", "4") for p in wb]
    keys += [f"mlp.lin{i}.{p}" for i in (1, 2) for p in wb] + _public_attention("multi_head_self_attention.")
    for k, side in itertools.product(range(blocks), ("image", "prompt")):
        b = f"bidirectional_attentions.{k}."
        mods = [f"{side}_conv1", f"{side}_conv2", f"{side}_norm"] + [f"{side}_addnorm{i}" for i in (1, 2, 3)]
        keys += [f"{b}{m}.{p}" for m in mods for p in wb] + _public_attention(f"{b}{side}_multiheadattn.")
        keys += [f"{b}mlp{1 if side == 'image' else 2}.lin{i}.{p}" for i in (1, 2) for p in wb]
    return keys


def test_public_mea_names_map_onto_ours_one_to_one():
    net = make_net(fusion="mea", mea_blocks=2)
    ours = {k for k in net.state_dict() if k.startswith("fusion.")}
    mapped = [public_mea_key(k) for k in _public_mea_keys(2)]
    assert mapped.count(None) == 2  # add_norm4 (weight, bias): built but unused upstream
    mapped = [m for m in mapped if m is not None]
    assert len(mapped) == len(set(mapped)) and set(mapped) == ours


def test_public_lora_converts_to_loralib():
    src = make_net(seed=0, fusion="sum")
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    public = {}
    r = src.config.lora_rank
    for k, v in src.state_dict().items():
        stem, leaf = k.rsplit(".", 1)
        if ".attn.qkv" not in k:
            public[f"lora_sam.sam.{k}"] = v
        elif leaf in ("weight", "bias"):  # upstream wraps the pretrained qkv: attn.qkv.qkv.*
            public[f"lora_sam.sam.{stem}.qkv.{leaf}"] = v
        else:  # loralib's stacked A (2r, in) / B (2 dim, r) -> upstream's q and v Linear layers
            half = r if leaf == "lora_A" else v.shape[0] // 2
            ab = "a" if leaf == "lora_A" else "b"
            public[f"lora_sam.sam.{stem}.linear_{ab}_q.weight"] = v[:half]
            public[f"lora_sam.sam.{stem}.linear_{ab}_v.weight"] = v[half:]
    dst = make_net(seed=1, fusion="sum")
    load_sam_med3d(dst, public)  # recognised as the public format and converted (convert_public_msam)
    image, _ = blob_batch(1)
    with torch.no_grad():
        assert torch.allclose(src.encode(image), dst.encode(image), atol=1e-6)


def test_decomposed_rel_pos_matches_brute_force_and_sam_med3d_mode_differs():
    g, hd = 3, 4
    torch.manual_seed(0)
    q, attn = torch.randn(2, g**3, hd), torch.randn(2, g**3, g**3)
    tables = tuple(torch.randn(2 * g - 1, hd) for _ in range(3))
    out = add_decomposed_rel_pos_3d(attn, q, tables, (g, g, g), (g, g, g), "decomposed")
    coords = list(itertools.product(range(g), repeat=3))
    ref = attn.clone()
    for i, ci in enumerate(coords):
        for j, cj in enumerate(coords):
            for axis in range(3):
                ref[:, i, j] += q[:, i] @ tables[axis][ci[axis] - cj[axis] + g - 1]
    assert torch.allclose(out, ref, atol=1e-5)
    upstream = add_decomposed_rel_pos_3d(attn, q, tables, (g, g, g), (g, g, g), "sam_med3d")
    assert not torch.allclose(upstream, ref, atol=1e-3)


def test_dense_pe_axis_order():
    from sautomed.models.msam.prompt3d import PositionEmbeddingRandom3D

    torch.manual_seed(0)
    for order in ("sam_med3d", "consistent"):
        pe = PositionEmbeddingRandom3D(16, axis_order=order)
        dense = pe((4, 4, 4))  # (48, 4, 4, 4)
        i, j, k = 0, 3, 1
        point = torch.tensor([[[(i + 0.5) * 8, (j + 0.5) * 8, (k + 0.5) * 8]]])  # centre of cell (i, j, k)
        enc = pe.forward_with_coords(point, (32, 32, 32))[0, 0]
        cell = (j, i, k) if order == "sam_med3d" else (i, j, k)  # SAM-Med3D: d and h swapped in the grid
        assert torch.allclose(enc, dense[:, cell[0], cell[1], cell[2]], atol=1e-5), order
