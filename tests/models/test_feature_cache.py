"""The frozen encoder's feature cache: in memory up to its limit, memory-mapped beyond, refused with the
figures when it has nowhere to go; the fit's feature encoding stops on SIGTERM and on a budget it cannot
fit."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sautomed.errors import UserError
from sautomed.models.sautomed.feature_cache import FeatureCache


def _features(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 3, generator=gen) for _ in range(n)]


def test_a_small_cache_stays_in_memory():
    cache = FeatureCache(limit_bytes=10_000)
    cache.expect(5)
    for k, f in enumerate(_features(5)):
        cache[k] = f
    assert cache.where == "ram" and len(cache) == 5 and 3 in cache and 7 not in cache
    assert cache[2].dtype == torch.float16
    torch.testing.assert_close(cache[2].float(), _features(5)[2], atol=2e-3, rtol=2e-3)


def test_a_cache_over_its_limit_is_memory_mapped_on_disk_and_deleted_with_it(tmp_path):
    cache = FeatureCache(limit_bytes=100, folder=tmp_path)  # 5 x 36 x 2 bytes = 360 > 100
    cache.expect(5)
    feats = _features(5)
    for k in (4, 0, 2):
        cache[k] = feats[k]
    files = list(tmp_path.iterdir())
    assert cache.where != "ram" and len(files) == 1 and files[0].stat().st_size == 5 * 36 * 2
    assert len(cache) == 3 and 2 in cache and 1 not in cache
    torch.testing.assert_close(cache[4].float(), feats[4], atol=2e-3, rtol=2e-3)
    with pytest.raises(KeyError):
        cache[1]
    cache.clear()
    assert list(tmp_path.iterdir()) == [] and len(cache) == 0


def test_a_cache_over_its_limit_with_no_folder_is_refused_with_the_figures():
    cache = FeatureCache(limit_bytes=100)
    cache.expect(1000)
    with pytest.raises(UserError, match=r"would need 0\.0 GiB for 1000 slices.*augmented_copies"):
        cache[0] = _features(1)[0]


def _encoding_module(tmp_path, tiny_sam_checkpoint, monkeypatch, frozen_tiny, max_time=None):
    """A frozen tiny module whose trainer says what a fit would: SIGTERM received or not, time left."""
    from types import SimpleNamespace

    from sautomed.models.sautomed.module import SAutoMedModule

    module = SAutoMedModule(network=frozen_tiny(tiny_sam_checkpoint))
    trainer = SimpleNamespace(received_sigterm=False, callbacks=[])
    monkeypatch.setattr(SAutoMedModule, "trainer", property(lambda self: trainer))
    return module, trainer


def test_the_feature_encoding_stops_on_sigterm(tmp_path, tiny_sam_checkpoint, monkeypatch, frozen_tiny):
    module, trainer = _encoding_module(tmp_path, tiny_sam_checkpoint, monkeypatch, frozen_tiny)
    module._check_encoding(8, 800)  # before a signal: goes on
    trainer.received_sigterm = True
    with pytest.raises(SIGTERMException):
        module._check_encoding(16, 800)


def test_an_encoding_that_cannot_fit_the_budget_stops_early_with_the_figures(
    tmp_path, tiny_sam_checkpoint, monkeypatch, frozen_tiny
):
    import sautomed.models.sautomed.module as module_file

    module, trainer = _encoding_module(tmp_path, tiny_sam_checkpoint, monkeypatch, frozen_tiny)
    clock = iter([100.0, 110.0])  # 10 s for the 32 slices after the first chunk
    monkeypatch.setattr(module_file.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(module_file, "time_remaining", lambda t: 60.0)  # a minute of max_time left
    module._check_encoding(8, 1000)  # starts the estimate
    with pytest.raises(UserError, match=r"needs about \d+ s at 0\.\d+ s a slice.*leaves 60 s"):
        module._check_encoding(40, 1000)
