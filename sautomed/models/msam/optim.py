"""M-SAM's optimiser: AdamW over the trainable parameters, in the public code's learning-rate groups.

The image encoder (its LoRA, or all of it when fine-tuned), the Mask-Enhanced Adapter and the local click
head (when configured) train at ``lr``;
the prompt encoder and mask decoder at ``lr * decoder_lr_scale``. Frozen parameters join no group, and
empty groups are left out. The schedule is the LightningModule's (module.py, ``sautomed/schedule.py``).
"""

from __future__ import annotations

import torch

from sautomed.models.msam.network import MSAMNet


def build_optimizer(
    net: MSAMNet, lr: float, decoder_lr_scale: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over ``net``'s trainable parameters: encoder and adapter at ``lr``, prompt encoder and decoder
    at ``lr * decoder_lr_scale``."""
    head = net.local_head or torch.nn.Module()  # the local click head, when configured
    groups = [
        {"params": [p for p in net.image_encoder.parameters() if p.requires_grad], "lr": lr},
        {"params": [p for p in net.fusion.parameters() if p.requires_grad], "lr": lr},
        {"params": [p for p in head.parameters() if p.requires_grad], "lr": lr},
        {
            "params": [
                p for m in (net.prompt_encoder, net.mask_decoder) for p in m.parameters() if p.requires_grad
            ],
            "lr": lr * decoder_lr_scale,
        },
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
