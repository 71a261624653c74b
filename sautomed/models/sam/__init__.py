"""Shared SAM pieces: segment-anything's modules (loaded without torchvision), builders, LoRA, checkpoints."""

from sautomed.models.sam.build import SAM_VARIANTS, SamParts, SamVariant, build_sam_parts
from sautomed.models.sam.checkpoint import LoadReport, SamCheckpointError, load_sam_checkpoint
from sautomed.models.sam.lora import apply_lora, set_encoder_trainable

__all__ = [
    "SAM_VARIANTS",
    "LoadReport",
    "SamCheckpointError",
    "SamParts",
    "SamVariant",
    "apply_lora",
    "build_sam_parts",
    "load_sam_checkpoint",
    "set_encoder_trainable",
]
