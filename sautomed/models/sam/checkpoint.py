"""Loading official SAM checkpoints (``sam_vit_b_01ec64.pth`` format) into a model built at any input size.

The official files hold ``image_encoder.*``, ``prompt_encoder.*`` and ``mask_decoder.*`` for S = 1024. For
another S the absolute position embedding (1, 64, 64, C) is resized bicubically to (1, S/16, S/16, C) and the
relative-position tables of the global-attention blocks (2*64-1, head_dim) linearly to (2*S/16-1, head_dim).
Windowed blocks keep their 14x14 windows, so their tables load unchanged.

Strict about everything else: a key of the model that the checkpoint lacks is allowed only if the model says
it belongs to a new module; a checkpoint key the model neither has nor lists as known-unused, or a shape that
no rule fixes, raises :class:`SamCheckpointError` naming the keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_POS_EMBED = re.compile(r"(^|\.)pos_embed$")
_REL_POS = re.compile(r"(^|\.)blocks\.\d+\.attn\.rel_pos_[hw]$")


class SamCheckpointError(RuntimeError):
    """A SAM checkpoint does not fit the model; the message names the offending keys."""


@dataclass
class LoadReport:
    """What loading a SAM checkpoint did."""

    source: str
    loaded: list[str] = field(default_factory=list)  # model keys filled straight from the checkpoint
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks (new modules only)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys not used (known: SAM's IoU head...)
    interpolated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    initialised: dict[str, str] = field(default_factory=dict)  # new key -> checkpoint key it was derived from

    def __str__(self) -> str:
        lines = [
            f"SAM checkpoint {self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.interpolated)} interpolated, "
            f"{len(self.initialised)} new tensors initialised from it, "
            f"{len(self.missing)} missing (new modules), "
            f"{len(self.unexpected)} unexpected (unused by this model)"
        ]
        for k, (a, b) in self.interpolated.items():
            lines.append(f"  interpolated {k}: {list(a)} -> {list(b)}")
        if self.unexpected:
            lines.append("  unexpected: " + ", ".join(self.unexpected))
        if self.missing:
            lines.append("  missing: " + _summarise(self.missing))
        return "\n".join(lines)


def _summarise(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_sam_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a checkpoint file to a flat state dict on the CPU (tensors only; no code is unpickled)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):  # tolerate {"model": sd} / {"state_dict": sd}
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise SamCheckpointError(f"{path}: not a state dict of tensors")
    return dict(obj)


def resize_pos_embed(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """(1, H, W, C) -> (1, h, w, C), bicubic."""
    x = pos.permute(0, 3, 1, 2).float()  # (1, C, H, W)
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).to(pos.dtype)


def resize_rel_pos(table: Tensor, length: int) -> Tensor:
    """(L, head_dim) -> (length, head_dim), linear (as segment-anything's ``get_rel_pos`` does on the fly)."""
    x = table.float().t().unsqueeze(0)  # (1, head_dim, L)
    x = F.interpolate(x, size=length, mode="linear", align_corners=False)
    return x.squeeze(0).t().contiguous().to(table.dtype)


def load_sam_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    is_new_key: Callable[[str], bool],
    known_unused: Callable[[str], bool],
    global_rel_pos_keys: set[str],
    derived: Callable[[Mapping[str, Tensor]], dict[str, tuple[Tensor, str]]] | None = None,
) -> LoadReport:
    """Load an official SAM state dict into ``model`` whose keys follow SAM's (``image_encoder.*`` ...).

    Args:
        model: the model; its state-dict keys that exist in SAM carry SAM's names.
        source: a checkpoint path or an already-read state dict.
        is_new_key: True for keys of modules SAM does not have (these may be missing).
        known_unused: True for SAM keys this model deliberately does not use (reported as unexpected).
        global_rel_pos_keys: the model's rel-pos keys of global-attention blocks (interpolated if S differs).
        derived: computes new-module tensors from the checkpoint: {model key: (tensor, source key)}.
    """
    name = os.fspath(source) if isinstance(source, str | os.PathLike) else "<state dict>"
    sd = read_sam_checkpoint(source) if isinstance(source, str | os.PathLike) else dict(source)
    own = model.state_dict()
    report = LoadReport(source=name)
    to_load: dict[str, Tensor] = {}
    bad_shape: list[str] = []
    strange: list[str] = []

    for key, value in sd.items():
        if key not in own:
            (report.unexpected if known_unused(key) else strange).append(key)
            continue
        target = own[key].shape
        if value.shape != target:
            if _POS_EMBED.search(key) and value.dim() == 4 and value.shape[-1] == target[-1]:
                value = resize_pos_embed(value, (target[1], target[2]))
            elif key in global_rel_pos_keys and value.dim() == 2 and value.shape[1] == target[1]:
                value = resize_rel_pos(value, target[0])
            else:
                bad_shape.append(f"{key} {list(value.shape)} vs model {list(target)}")
                continue
            report.interpolated[key] = (tuple(sd[key].shape), tuple(target))
        to_load[key] = value
        report.loaded.append(key)

    report.missing = [k for k in own if k not in sd]
    not_new = [k for k in report.missing if not is_new_key(k)]
    problems = []
    if not_new:
        problems.append(f"missing keys that are not new modules: {_summarise(not_new, 40)}")
    if strange:
        problems.append(f"unexpected keys: {_summarise(strange, 40)}")
    if bad_shape:
        problems.append(f"shape mismatches: {_summarise(bad_shape, 40)}")
    if problems:
        raise SamCheckpointError(f"SAM checkpoint {name} does not fit the model; " + "; ".join(problems))

    if derived is not None:
        for key, (tensor, src) in derived(sd).items():
            if key not in own or own[key].shape != tensor.shape:
                raise SamCheckpointError(f"cannot initialise {key} from {src}: shape {list(tensor.shape)}")
            to_load[key] = tensor
            report.initialised[key] = src

    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return report
