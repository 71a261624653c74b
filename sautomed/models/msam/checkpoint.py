"""SAM-Med3D checkpoints in and out: ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``.

In: a SAM-Med3D file (``sam_med3d.pth``, ``sam_med3d_turbo.pth``: ``{"model_state_dict": ...}``, or a bare
state dict) loads into :class:`MSAMNet` through the shared strict loader (``sam/checkpoint.py``): only LoRA's
``lora_A``/``lora_B`` and ``fusion.*`` may be missing, anything unknown raises. For another crop size the 3D
absolute position embedding is resized trilinearly and the global blocks' relative-position tables linearly
(as SAM-Med3D's own ``load_from`` does); windowed blocks keep their tables.

Also in: the public M-SAM training checkpoint (``CombinedModel``: ``lora_sam.sam.*`` with its own LoRA
layers, ``bidatt.*`` the MEA) is converted to our names (:func:`convert_public_msam`) and loaded the same way.

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

from sautomed.errors import UserError
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
    key = "prompt_encoder.mask_downscaling.0.weight"  # click maps (MSAMConfig.click_maps): extra inputs at 0
    if key in out and key in own and out[key].shape[1] == 1 and own[key].shape[1] > 1:
        extra = own[key].shape[1] - 1
        out[key] = torch.cat([out[key], out[key].new_zeros(out[key].shape[0], extra, *out[key].shape[2:])], 1)
        resized[key] = (tuple(sd[key].shape), tuple(own[key].shape))
    key = "image_encoder.patch_embed.proj.weight"  # several input channels: the one kernel shared out
    if key in out and key in own and out[key].shape[1] == 1 and own[key].shape[1] > 1:
        c = own[key].shape[1]
        out[key] = out[key].repeat(1, c, 1, 1, 1) / c  # equal channels give SAM-Med3D's response
        resized[key] = (tuple(sd[key].shape), tuple(own[key].shape))
    global_blocks = set(net.image_encoder.global_attn_indexes)
    for k, v in sd.items():
        m = _REL_POS.match(k)
        if m and int(m.group(1)) in global_blocks and k in own and v.shape != own[k].shape:
            out[k] = resize_rel_pos(v, own[k].shape[0])
            resized[k] = (tuple(v.shape), tuple(own[k].shape))
    return out, resized


def load_sam_med3d(net: MSAMNet, source: str | os.PathLike | Mapping[str, Tensor]) -> LoadReport:
    """Load a SAM-Med3D checkpoint (path or state dict) into ``net``; strict about everything but new keys.

    The public M-SAM training checkpoint (``lora_sam.sam.*``, ``bidatt.*``) is recognised and converted.
    """
    name = os.fspath(source) if isinstance(source, str | os.PathLike) else "<state dict>"
    sd = read_sam_med3d(source) if isinstance(source, str | os.PathLike) else dict(source)
    if any(k.startswith(("lora_sam.", "bidatt.")) for k in sd):  # the public M-SAM training checkpoint
        sd = convert_public_msam(sd, net.config.lora_alpha / max(1, net.config.lora_rank))
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
    if net.config.click_maps:
        raise UserError("a network with click_maps has no SAM-Med3D equivalent (its mask branch reads them)")
    if net.config.local_head:
        raise UserError("a network with local_head has no SAM-Med3D equivalent (its head adds to the logits)")
    if net.config.in_channels != 1:
        raise UserError(f"a network of {net.config.in_channels} input channels has no SAM-Med3D equivalent")
    sd = {k: v.detach().clone() for k, v in net.state_dict().items() if k.startswith(SAM_MED3D_PREFIXES)}
    for i, block in enumerate(net.image_encoder.blocks):
        sd[f"image_encoder.blocks.{i}.attn.qkv.weight"] = _merged_qkv_weight(block.attn.qkv)
    return {k: v for k, v in sd.items() if ".lora_" not in k}


def msam_state_dict(net: MSAMNet) -> dict[str, Tensor]:
    """Every tensor of ``net`` under SAM-Med3D's names (+ ``lora_*`` and ``fusion.*``); loads back exactly."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# -- the public M-SAM training checkpoint (``CombinedModel(lora_sam, bidatt)``) ------------------------

_PUBLIC_ATTN = (
    ("qkv.", "attn.qkv."),
    ("proj.", "attn.proj."),
    ("rel_pos_", "attn.rel_pos_"),
    ("mlp.", "mlp.mlp."),
)
_PUBLIC_BRANCH = {  # public name inside a BiDirectionalAttention block -> ours inside MEABlock
    "image_conv1.": "image.refine.conv1.",
    "image_norm.": "image.refine.norm.",
    "image_conv2.": "image.refine.conv2.",
    "image_addnorm1.": "image.refine.addnorm.",
    "image_multiheadattn.": "image.attn.",
    "image_addnorm2.": "image.norm_attn.",
    "mlp1.": "image.mlp.mlp.",
    "image_addnorm3.": "image.norm_mlp.",
    "prompt_conv1.": "mask.refine.conv1.",
    "prompt_norm.": "mask.refine.norm.",
    "prompt_conv2.": "mask.refine.conv2.",
    "prompt_addnorm1.": "mask.refine.addnorm.",
    "prompt_multiheadattn.": "mask.attn.",
    "prompt_addnorm2.": "mask.norm_attn.",
    "mlp2.": "mask.mlp.mlp.",
    "prompt_addnorm3.": "mask.norm_mlp.",
}
_PUBLIC_TOP = {
    "add_norm3.": "norm_image.",
    "add_norm2.": "norm_mask.",
    "multi_head_self_attention.": "attn.",
    "add_norm.": "norm_out.",
    "mlp.": "mlp.mlp.",
}


def _attn_key(rest: str) -> str:
    """Inside the public MEA ``Attention`` (norm1, qkv, proj, rel_pos_*, norm2, mlp) -> our ``MaskedAttn``."""
    for old, new in _PUBLIC_ATTN:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest  # norm1.*, norm2.*


def public_mea_key(key: str) -> str | None:
    """A key of the public ``BiDirectionalAttentionNetwork`` -> ours under ``fusion.`` (None: unused)."""
    m = re.match(r"^bidirectional_attentions\.(\d+)\.(.*)$", key)
    if m:
        block, rest = m.groups()
        for old, new in _PUBLIC_BRANCH.items():
            if rest.startswith(old):
                inner = rest[len(old) :]
                if old.endswith("multiheadattn."):
                    inner = _attn_key(inner)
                return f"fusion.blocks.{block}.{new}{inner}"
        return None
    if key.startswith("add_norm4."):
        return None  # built but never used by the public forward
    for old, new in _PUBLIC_TOP.items():
        if key.startswith(old):
            inner = key[len(old) :]
            return "fusion." + new + (_attn_key(inner) if old == "multi_head_self_attention." else inner)
    return None


def convert_public_msam(sd: Mapping[str, Tensor], lora_scaling: float = 1.0) -> dict[str, Tensor]:
    """The public M-SAM ``CombinedModel`` state dict (``lora_sam.sam.*``, ``bidatt.*``) -> our names.

    Its LoRA (``qkv.linear_a_q/b_q/a_v/b_v``, unscaled) becomes loralib's ``lora_A`` = [A_q; A_v] and
    ``lora_B`` = [B_q; B_v] / ``lora_scaling`` (our ``lora_alpha / lora_rank``).
    """
    out: dict[str, Tensor] = {}
    lora: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if key.startswith("bidatt."):
            new = public_mea_key(key.removeprefix("bidatt."))
            if new is not None:
                out[new] = value
            continue
        key = key.removeprefix("lora_sam.").removeprefix("sam.")
        m = re.match(r"^(image_encoder\.blocks\.\d+\.attn\.qkv)\.(qkv|linear_[ab]_[qv])\.weight$", key)
        if m and m.group(2) != "qkv":
            lora.setdefault(m.group(1), {})[m.group(2)] = value
        elif m:
            out[f"{m.group(1)}.weight"] = value
        else:
            out[key.replace(".qkv.qkv.", ".qkv.")] = value
    for prefix, parts in lora.items():
        out[f"{prefix}.lora_A"] = torch.cat([parts["linear_a_q"], parts["linear_a_v"]], 0)
        out[f"{prefix}.lora_B"] = torch.cat([parts["linear_b_q"], parts["linear_b_v"]], 0) / lora_scaling
    return out
