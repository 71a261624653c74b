"""Refusals at construction, where a wrong run would otherwise train and look right.

`check_encoder_finetune` refuses LoRA on a randomly initialised encoder (only the rank-r adapters would
train on top of random, frozen weights) and a frozen random encoder (nothing in it would ever train), in
every family. It does not apply when the weights come from elsewhere: from a
trained sautomed checkpoint (`from_checkpoint_dict`, `sautomed predict`, `--ckpt_path`), or when they do not
matter (`sautomed bench` measures speed and memory); construction then runs inside
`weights_from_elsewhere()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from sautomed.errors import UserError

_WEIGHTS_FROM_ELSEWHERE: ContextVar[bool] = ContextVar("sautomed_weights_from_elsewhere", default=False)


@contextmanager
def weights_from_elsewhere() -> Iterator[None]:
    """Modules built inside this block get their weights from a trained checkpoint (or need none)."""
    token = _WEIGHTS_FROM_ELSEWHERE.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_ELSEWHERE.reset(token)


def _needs_checkpoint(
    setting: str, value: str, consequence: str, checkpoint: str | None, name: str = "sam_checkpoint"
) -> None:
    """UserError: `model.network.<setting>: <value>` without a checkpoint would train nothing real."""
    if not checkpoint and not _WEIGHTS_FROM_ELSEWHERE.get():
        raise UserError(
            f"model.network.{setting} is '{value}' but no model.network.{name} is given: "
            f"{consequence}; give model.network.{name}, or set model.network.{setting}: full"
        )


_ENCODER_CONSEQUENCE = {
    "lora": "LoRA would adapt a randomly initialised, frozen encoder",
    "frozen": "the encoder would keep randomly initialised weights that never train",
}


def check_encoder_finetune(
    encoder_finetune: str, sam_checkpoint: str | None, name: str = "sam_checkpoint"
) -> None:
    """UserError for `encoder_finetune: lora` or `frozen` without a checkpoint (not when weights come from
    one): either leaves a random encoder that never trains. `name`: the family's checkpoint setting."""
    if encoder_finetune in _ENCODER_CONSEQUENCE:
        consequence = _ENCODER_CONSEQUENCE[encoder_finetune]
        _needs_checkpoint("encoder_finetune", encoder_finetune, consequence, sam_checkpoint, name)


def check_sam_decoder_finetune(sam_decoder_finetune: str, sam_checkpoint: str | None) -> None:
    """UserError for `sam_decoder_finetune: frozen` without `sam_checkpoint` (random, never trained)."""
    if sam_decoder_finetune == "frozen":
        consequence = "SAM's decoder would keep randomly initialised weights that never train"
        _needs_checkpoint("sam_decoder_finetune", "frozen", consequence, sam_checkpoint)
