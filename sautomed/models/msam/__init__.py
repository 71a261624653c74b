"""M-SAM (Mask-Enhanced SAM, MICCAI 2024): a 3D SAM in SAM-Med3D's layout with the Mask-Enhanced Adapter.

Pieces: ``encoder3d`` (3D ViT + neck), ``prompt3d`` (points and coarse mask), ``mea`` (the adapter and the
``sum`` / ``cross_attention`` ablations), ``decoder3d`` (SAM's mask decoder in 3D), ``network`` (the whole
net and its config), ``clicks`` / ``refinement`` (simulated clicks, the iterative loop), ``loss``,
``checkpoint`` (SAM-Med3D state dicts), ``patches`` (3D training crops), ``automatic`` (sliding-window,
self-prompted segmentation of whole volumes), ``evaluation`` (the oracle-prompted evaluation, its metrics
rows and the validate / test report), ``optim`` (the optimiser's parameter groups) and ``module`` (the
LightningModule). This family imports nothing from ``sautomed.models.sautomed``.
"""

from sautomed.models.msam.network import VARIANTS, MSAMConfig, MSAMNet, build_network

__all__ = ["VARIANTS", "MSAMConfig", "MSAMNet", "build_network"]
