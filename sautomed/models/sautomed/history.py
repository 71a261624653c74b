"""Global 3D awareness: historical slice information sharing (HIS).

K learnable history tokens travel from slice to slice. At each slice they join the decoder's output tokens in
SAM's two-way transformer (see ``decoder.py``); the updated tokens pass the filter (MLP + LayerNorm, residual)
and become the next slice's history:  his_{t+1} = LN(h + MLP(h)),  h = updated history tokens of slice t.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sautomed.models.sam.upstream import MLPBlock


class HistoryTokens(nn.Module):
    """The initial history tokens and the filter."""

    def __init__(self, dim: int = 256, num_tokens: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.initial = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_tokens, dim), std=0.02))
        self.filter_mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.filter_norm = nn.LayerNorm(dim)

    @property
    def num_tokens(self) -> int:
        return self.initial.shape[0]

    def initial_state(self, batch: int) -> Tensor:
        """(batch, K, D) initial history (a view of the learnable tokens, so gradients reach them)."""
        return self.initial.unsqueeze(0).expand(batch, -1, -1)

    def filter(self, updated: Tensor) -> Tensor:
        """(B, K, D) tokens updated by the decoder -> (B, K, D) history for the next slice."""
        return self.filter_norm(updated + self.filter_mlp(updated))
