"""LiteMedSAM as published: TinyViT encoder + SAM's prompt encoder + SAM's single-mask decoder, box prompts.

This is the model the checkpoint was trained as (strict load, every key). sautomed uses it to check the
weights zero-shot (the ground-truth box of an organ on a slice -> that organ's mask) and as a box-prompted
2D segmenter in its own right; 3D-SAutoMed builds its network from the same parts (``backbone: litemedsam``).

    model = LiteMedSAM.from_checkpoint("lite_medsam.pth")
    masks = model.segment_boxes(slices, boxes)  # (N, S, S) in [0, 1], (N, 4) xyxy pixels -> (N, S, S) bool
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sautomed.models.sam.build import build_litemedsam_parts
from sautomed.models.sam.checkpoint import read_sam_checkpoint
from sautomed.models.sam.weights import resolve_weights


class LiteMedSAM(nn.Module):
    """The three LiteMedSAM modules under their checkpoint names, at input size S (256 as trained)."""

    def __init__(self, image_size: int = 256) -> None:
        super().__init__()
        parts = build_litemedsam_parts(image_size)
        self.image_size = image_size
        self.image_encoder = parts.image_encoder
        self.prompt_encoder = parts.prompt_encoder
        self.mask_decoder = parts.mask_decoder

    @classmethod
    def from_checkpoint(cls, source: str | os.PathLike, image_size: int = 256) -> LiteMedSAM:
        """Load ``lite_medsam.pth`` (a path, or the name ``litemedsam``) with ``strict=True``."""
        model = cls(image_size)
        sd = read_sam_checkpoint(resolve_weights(os.fspath(source)))
        model.load_state_dict(sd, strict=True)
        return model.eval()

    @staticmethod
    def normalise(slices: Tensor) -> Tensor:
        """MedSAM's per-image min-max to [0, 1]: (N, S, S) -> (N, 3, S, S)."""
        lo = slices.amin(dim=(-2, -1), keepdim=True)
        hi = slices.amax(dim=(-2, -1), keepdim=True)
        x = (slices - lo) / (hi - lo).clamp_min(1e-8)
        return x.unsqueeze(1).expand(-1, 3, -1, -1)

    @torch.no_grad()
    def encode(self, slices: Tensor) -> Tensor:
        """(N, S, S) slices -> (N, 256, S/4, S/4) image embeddings."""
        return self.image_encoder(self.normalise(slices.float()))

    @torch.no_grad()
    def box_probabilities(self, feats: Tensor, boxes: Tensor) -> Tensor:
        """(N, 256, h, w) embeddings, (N, 4) boxes (x0, y0, x1, y1 in pixels of S) -> (N, S, S) mask
        probabilities of SAM's single-mask box path."""
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes[:, None].float(), masks=None)
        pe = self.prompt_encoder.get_dense_pe()
        # SAM's decoder repeats one image's embedding for each of its prompts: one image at a time
        logits = torch.cat(
            [
                self.mask_decoder(
                    image_embeddings=feats[i : i + 1],
                    image_pe=pe,
                    sparse_prompt_embeddings=sparse[i : i + 1],
                    dense_prompt_embeddings=dense[i : i + 1],
                    multimask_output=False,
                )[0]
                for i in range(len(feats))
            ]
        )  # (N, 1, 4h, 4w) = (N, 1, S, S)
        S = self.image_size
        if logits.shape[-1] != S:
            logits = F.interpolate(logits, size=(S, S), mode="bilinear", align_corners=False)
        return torch.sigmoid(logits[:, 0])

    @torch.no_grad()
    def image_box_probabilities(self, feat: Tensor, boxes: Tensor) -> Tensor:
        """One image's (1, 256, h, w) embedding and its (k, 4) boxes -> (k, S, S) mask probabilities, in one
        decoder call (SAM's decoder repeats the embedding for each prompt; as ``box_probabilities``)."""
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes[:, None].float(), masks=None)
        logits = self.mask_decoder(
            image_embeddings=feat,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )[0]  # (k, 1, 4h, 4w)
        S = self.image_size
        if logits.shape[-1] != S:
            logits = F.interpolate(logits, size=(S, S), mode="bilinear", align_corners=False)
        return torch.sigmoid(logits[:, 0])

    def decode_boxes(self, feats: Tensor, boxes: Tensor, threshold: float = 0.5) -> Tensor:
        """(N, 256, h, w) embeddings, (N, 4) boxes (x0, y0, x1, y1 in pixels of S) -> (N, S, S) bool."""
        return self.box_probabilities(feats, boxes) > threshold

    def segment_boxes(self, slices: Tensor, boxes: Tensor, threshold: float = 0.5) -> Tensor:
        """(N, S, S) slices, (N, 4) boxes (x0, y0, x1, y1 in pixels of S) -> (N, S, S) bool masks."""
        return self.decode_boxes(self.encode(slices), boxes, threshold)


def box_of(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (x0, y0, x1, y1) tight box in pixel coordinates (MedSAM's convention)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)
