"""predict's flags change the checkpoint's inference settings only when given, both ways."""

from __future__ import annotations

import pytest

from sautomed.predict import build_parser, inference_changes


def _changes(*flags: str) -> dict:
    return inference_changes(
        build_parser().parse_args(["--ckpt_path", "m.ckpt", "-i", "in", "-o", "out", *flags])
    )


def test_flags_not_given_leave_the_checkpoint_settings():
    assert _changes() == {}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--largest-component"], {"largest_component": True}),
        (["--no-largest-component"], {"largest_component": False}),  # a model fitted with it on, turned off
        (["--no-sam-refine", "--bf16"], {"sam_refine": False, "bf16": True}),
    ],
)
def test_a_flag_turns_its_setting_on_or_off(flags, expected):
    assert _changes(*flags) == expected


def test_turning_off_the_largest_component_reaches_an_msam_model():
    from sautomed.families import with_inference_changes
    from sautomed.models.msam.automatic import AutoSettings
    from sautomed.models.msam.module import MSAMModule
    from sautomed.models.msam.network import MSAMConfig

    module = MSAMModule(
        network=MSAMConfig(variant="tiny", image_size=32), automatic=AutoSettings(largest_component=True)
    )
    module.inference = with_inference_changes(module, _changes("--no-largest-component"))
    assert module.automatic.largest_component is False
