"""Refusals at construction, where a wrong run would otherwise train and look right.

`check_encoder_finetune` refuses LoRA on a randomly initialised encoder: only the rank-r adapters would
train on top of random, frozen weights. It does not apply when the weights come from elsewhere: from a
trained sautomed checkpoint (`from_checkpoint_dict`, `sautomed predict`, `--ckpt_path`), or when they do not
matter (`sautomed bench` measures speed and memory); construction then runs inside
`weights_from_elsewhere()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from sautomed.run_folder import UserError

_WEIGHTS_FROM_ELSEWHERE: ContextVar[bool] = ContextVar("sautomed_weights_from_elsewhere", default=False)


@contextmanager
def weights_from_elsewhere() -> Iterator[None]:
    """Modules built inside this block get their weights from a trained checkpoint (or need none)."""
    token = _WEIGHTS_FROM_ELSEWHERE.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_ELSEWHERE.reset(token)


def check_encoder_finetune(encoder_finetune: str, sam_checkpoint: str | None) -> None:
    """UserError for `encoder_finetune: lora` without `sam_checkpoint` (not when weights come from one)."""
    if encoder_finetune == "lora" and not sam_checkpoint and not _WEIGHTS_FROM_ELSEWHERE.get():
        raise UserError(
            "model.network.encoder_finetune is 'lora' but no model.network.sam_checkpoint is given: LoRA "
            "would adapt a randomly initialised, frozen encoder; give model.network.sam_checkpoint, or set "
            "model.network.encoder_finetune: full"
        )


def check_sam_decoder_finetune(sam_decoder_finetune: str, sam_checkpoint: str | None) -> None:
    """UserError for `sam_decoder_finetune: frozen` without `sam_checkpoint` (random, never trained)."""
    if sam_decoder_finetune == "frozen" and not sam_checkpoint and not _WEIGHTS_FROM_ELSEWHERE.get():
        raise UserError(
            "model.network.sam_decoder_finetune is 'frozen' but no model.network.sam_checkpoint is given: "
            "SAM's decoder would keep randomly initialised weights that never train; give "
            "model.network.sam_checkpoint, or set model.network.sam_decoder_finetune: full"
        )
