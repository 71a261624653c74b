"""Click-consistent decoding at inference: f-BRS-B (Sofiiuk et al., CVPR 2020), our addition to M-SAM.

A network trained on a few cases often ignores a click on an image unlike its training data: the voxel
clicked stays wrong, and the next click lands in the same mistake. f-BRS makes every click count at
inference without retraining: before each decode it fits a per-channel scale ``s`` and bias ``b`` of the
image embedding, ``E_I' = s * E_I + b``, so that the logits at the voxels clicked so far take the clicks'
signs (binary cross-entropy on those voxels, an L2 pull of ``s`` to 1 and ``b`` to 0). Only the decoder
runs in the loop (the encoder's output is reused); the network's weights never change, and nothing is
learnt from one case to the next: ``s`` and ``b`` start from (1, 0) for every crop and carry over from one
click to the next within it.

The oracle-prompted evaluation uses it when ``evaluation.brs_steps`` > 0 (and says so in ``summary.json``);
``steps`` = 0 is the plain network. Training never uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sautomed.models.msam.network import MSAMNet


@dataclass(frozen=True)
class BRSSettings:
    """f-BRS-B settings.

    Attributes:
        steps: at most this many Adam steps per click (0: off, the plain network); the loop stops early once
            every click so far has its sign by ``margin``.
        lr: Adam's learning rate on the scale and bias.
        weight: the L2 weight pulling the scale to 1 and the bias to 0 (per channel, mean).
        margin: the logit a click's voxel must reach (positive clicks) or stay below (negative, -margin).
    """

    steps: int = 0
    lr: float = 0.05
    weight: float = 1.0e-3
    margin: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.weight < 0 or self.margin < 0:
            raise ValueError(f"invalid BRS settings {self}: steps >= 0, lr > 0, weight >= 0, margin >= 0")


class ClickConsistentDecoder:
    """Decodes one batch of crops, fitting the embedding's scale and bias to the clicks (see module doc).

    Args:
        net: the network (eval mode; its weights are not touched).
        embedding: E_I (B, C, g, g, g) from ``net.encode``.
        settings: the f-BRS settings; ``steps`` = 0 makes :meth:`decode` the plain ``net.decode``.
    """

    def __init__(self, net: MSAMNet, embedding: Tensor, settings: BRSSettings) -> None:
        self.net, self.embedding, self.settings = net, embedding, settings
        shape = (embedding.shape[0], embedding.shape[1]) + (1,) * (embedding.dim() - 2)
        self.scale = torch.ones(shape, dtype=embedding.dtype, device=embedding.device)
        self.bias = torch.zeros(shape, dtype=embedding.dtype, device=embedding.device)
        self.steps_taken = 0

    def _clicked_logits(self, low: Tensor, points: Tensor) -> Tensor:
        """(B, 1, 4g^3) low-res logits -> (B, K) full-size logits at the (B, K, 3) voxel indices."""
        full = self.net.upscale(low)[:, 0]  # (B, S, S, S)
        b = torch.arange(full.shape[0], device=full.device)[:, None].expand(-1, points.shape[1])
        p = points.long()
        return full[b, p[..., 0], p[..., 1], p[..., 2]]

    def decode(
        self,
        points: tuple[Tensor, Tensor] | None,
        prev_low_res: Tensor | None,
        clicks: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """``net.decode(s * E_I + b, points, prev_low_res, clicks)`` with (s, b) fitted to ``clicks`` (every
        click so far: (B, K, 3) voxel indices, (B, K) labels 1 / 0) -> low-res logits (B, 1, 4g^3)."""
        cfg = self.settings
        if cfg.steps == 0 or clicks is None:
            return self.net.decode(self._embedding(), points, prev_low_res, clicks)
        where, labels = clicks
        target = labels.to(self.embedding.dtype)  # (B, K)
        sign = 2 * target - 1
        scale = self.scale.clone().requires_grad_(True)
        bias = self.bias.clone().requires_grad_(True)
        opt = torch.optim.Adam([scale, bias], lr=cfg.lr)
        with torch.enable_grad():
            for _ in range(cfg.steps):
                low = self.net.decode(self.embedding * scale + bias, points, prev_low_res, clicks)
                logits = self._clicked_logits(low, where)  # (B, K)
                if bool((logits * sign >= cfg.margin).all()):
                    break
                loss = F.binary_cross_entropy_with_logits(logits, target) + cfg.weight * (
                    (scale - 1).pow(2).mean() + bias.pow(2).mean()
                )
                grads = torch.autograd.grad(loss, [scale, bias])
                scale.grad, bias.grad = grads
                opt.step()
                self.steps_taken += 1
        self.scale, self.bias = scale.detach(), bias.detach()
        with torch.no_grad():
            return self.net.decode(self._embedding(), points, prev_low_res, clicks)

    def _embedding(self) -> Tensor:
        return self.embedding * self.scale + self.bias
