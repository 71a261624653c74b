"""SAM-Med3D checkpoints in and out: ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``.

In: a SAM-Med3D file (``sam_med3d.pth``, ``sam_med3d_turbo.pth``: ``{"model_state_dict": ...}``, or a bare
state dict) loads into :class:`MSAMNet` through the shared strict loader (``sam/checkpoint.py``): only LoRA's
``lora_A``/``lora_B`` and ``fusion.*`` may be missing, anything unknown raises. For another crop size the 3D
absolute position embedding is resized trilinearly and the global blocks' relative-position tables linearly
(as SAM-Med3D's own ``load_from`` does); windowed blocks keep their tables.

Out: :func:`export_sam_med3d` gives the state dict SAM-Med3D's ``Sam3D`` loads: LoRA folded into the qkv
weights, ``fusion.*`` left out (SAM-Med3D has no MEA; M-SAM's own adapter travels in our Lightning
checkpoint). :func:`msam_state_dict` keeps everything (LoRA unmerged), the format M-SAM loads back exactly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from sautomed.models.msam.network import NEW_MODULE_PREFIXES, MSAMNet
from sautomed.models.sam.checkpoint import LoadReport, SamCheckpointError, resize_rel_pos

SAM_MED3D_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_REL_POS = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[dhw]$")


def read_sam_med3d(path: str | os.PathLike) -> dict[str, Tensor]:
    """A SAM-Med3D checkpoint file -> flat state dict (tensors only; ``weights_only`` unpickling)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # e.g. a training checkpoint that pickled its argparse namespace
        raise SamCheckpointError(
            f"{path}: cannot be read with weights_only=True ({e}); save its 'model_state_dict' alone"
        ) from e
    for wrapper in ("model_state_dict", "model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise SamCheckpointError(f"{path}: not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}


def adapt_to(net: MSAMNet, sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, tuple]]:
    """Resize the crop-size-dependent tensors of ``sd`` to ``net``: 3D pos embed, global rel-pos tables."""
    own = net.state_dict()
    out = dict(sd)
    resized: dict[str, tuple] = {}
    key = "image_encoder.pos_embed"
    if key in out and key in own and out[key].shape != own[key].shape and out[key].dim() == 5:
        x = out[key].permute(0, 4, 1, 2, 3).float()  # (1, C, g, g, g)
        x = F.interpolate(x, size=own[key].shape[1:4], mode="trilinear", align_corners=False)
        resized[key] = (tuple(out[key].shape), tuple(own[key].shape))
        out[key] = x.permute(0, 2, 3, 4, 1).to(sd[key].dtype)
    global_blocks = set(net.image_encoder.global_attn_indexes)
    for k, v in sd.items():
        m = _REL_POS.match(k)
        if m and int(m.group(1)) in global_blocks and k in own and v.shape != own[k].shape:
            out[k] = resize_rel_pos(v, own[k].shape[0])
            resized[k] = (tuple(v.shape), tuple(own[k].shape))
    return out, resized


def load_sam_med3d(net: MSAMNet, source: str | os.PathLike | Mapping[str, Tensor]) -> LoadReport:
    """Load a SAM-Med3D checkpoint (path or state dict) into ``net``; strict about everything but new keys."""
    name = os.fspath(source) if isinstance(source, str | os.PathLike) else "<state dict>"
    sd = read_sam_med3d(source) if isinstance(source, str | os.PathLike) else dict(source)
    sd, resized = adapt_to(net, sd)
    own = net.state_dict()
    report = LoadReport(source=name, interpolated=resized)
    strange = [k for k in sd if k not in own]
    bad = [
        f"{k} {list(v.shape)} vs {list(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in sd]
    not_new = [k for k in missing if not (k.startswith(NEW_MODULE_PREFIXES) or ".lora_" in k)]
    problems = []
    if not_new:
        problems.append("missing keys: " + ", ".join(not_new[:40]))
    if strange:
        problems.append("unexpected keys: " + ", ".join(strange[:40]))
    if bad:
        problems.append("shape mismatches: " + ", ".join(bad[:40]))
    if problems:
        raise SamCheckpointError(
            f"SAM-Med3D checkpoint {name} does not fit the model; " + "; ".join(problems)
        )
    net.load_state_dict(sd, strict=False)
    report.loaded = sorted(sd)
    report.missing = missing
    return report


def _merged_qkv_weight(layer: torch.nn.Module) -> Tensor:
    """The qkv weight with LoRA folded in (``loralib.MergedLinear``: W + scaling * zero_pad(B A))."""
    if not hasattr(layer, "merge_AB") or layer.r == 0:
        return layer.weight.detach().clone()
    return (layer.weight + layer.merge_AB() * layer.scaling).detach().clone()


def export_sam_med3d(net: MSAMNet) -> dict[str, Tensor]:
    """A SAM-Med3D ``Sam3D`` state dict of ``net``: LoRA merged into qkv, no ``fusion.*``, no LoRA keys."""
    sd = {k: v.detach().clone() for k, v in net.state_dict().items() if k.startswith(SAM_MED3D_PREFIXES)}
    for i, block in enumerate(net.image_encoder.blocks):
        sd[f"image_encoder.blocks.{i}.attn.qkv.weight"] = _merged_qkv_weight(block.attn.qkv)
    return {k: v for k, v in sd.items() if ".lora_" not in k}


def msam_state_dict(net: MSAMNet) -> dict[str, Tensor]:
    """Every tensor of ``net`` under SAM-Med3D's names (+ ``lora_*`` and ``fusion.*``); loads back exactly."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
