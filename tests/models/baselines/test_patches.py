"""3D training patches: shapes, padding of small volumes, seeded repeats, foreground oversampling."""

from __future__ import annotations

import numpy as np
import torch

from sautomed.data.augment import Augmentation
from sautomed.data.io import Geometry
from sautomed.data.preprocess import Prepared
from sautomed.models.baselines.patches import PatchDataset, Patches, crop

GEOM = Geometry(
    "x.nii.gz",
    (64, 64, 40),
    (1.0, 1.0, 1.0),
    (0.0, 0.0, 0.0),
    (1, 0, 0, 0, 1, 0, 0, 0, 1),
    (0, 1, 2),
    (False,) * 3,
)


def _volume(shape=(40, 64, 64), box=(slice(30, 34), slice(40, 46), slice(8, 14))) -> Prepared:
    image = np.random.default_rng(0).random(shape).astype(np.float16)
    label = np.zeros(shape, np.uint8)
    label[box] = 2  # one small organ, far from the centre
    return Prepared("case", image, label, GEOM, label)


def test_crop_pads_outside_the_volume_with_zeros():
    vol = np.arange(1, 28).reshape(3, 3, 3)
    out = crop(vol, (-1, 1, 2), (3, 3, 3))
    assert out.shape == (3, 3, 3)
    assert (out[0] == 0).all() and (out[:, 2] == 0).all() and (out[:, :, 1:] == 0).all()
    assert out[1, 0, 0] == vol[0, 1, 2] and out[2, 1, 0] == vol[1, 2, 2]


def test_patches_have_the_patch_shape_even_from_a_smaller_volume():
    ds = PatchDataset(
        [_volume((5, 20, 20), (slice(1, 3),) * 3)], Patches(size=(8, 32, 32)), 0, Augmentation()
    )
    for i in range(6):
        item = ds[(0, i, 1)]
        assert item["image"].shape == (1, 8, 32, 32) and item["label"].shape == (8, 32, 32)
        assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.long


def test_the_same_key_gives_the_same_patch_and_epochs_differ():
    ds = PatchDataset([_volume()], Patches(size=(8, 32, 32)), 3, Augmentation())
    a, b, c = ds[(0, 1, 1)], ds[(0, 1, 1)], ds[(1, 1, 1)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])


def test_a_foreground_fraction_of_patches_holds_the_small_organ():
    # the organ fills 4 x 6 x 6 voxels of 40 x 64 x 64; a random (8, 32, 32) patch holds it ~1 time in 10
    for fraction, low, high in ((0.0, 0.0, 0.25), (1.0, 0.999, 1.0), (0.33, 0.3, 0.55)):
        patches = Patches(size=(8, 32, 32), samples_per_epoch=200, foreground_fraction=fraction)
        ds = PatchDataset([_volume()], patches, 0, Augmentation(enabled=False))
        held = np.mean([bool((ds[(0, i, 1)]["label"] == 2).any()) for i in range(200)])
        assert low <= held <= high, (fraction, held)


def test_augmentation_keeps_image_and_label_aligned():
    vol = _volume()
    vol.image[:] = (vol.label > 0).astype(np.float16)  # the image is the organ mask
    aug = Augmentation(probability=1.0, gamma=(1.0, 1.0), contrast=(1.0, 1.0), noise_std=0.0)
    ds = PatchDataset([vol], Patches(size=(8, 32, 32), foreground_fraction=1.0), 0, aug)
    for i in range(5):
        item = ds[(0, i, 1)]
        inside = item["image"][0][item["label"] == 2]
        assert inside.numel() and inside.mean() > 0.8  # the rotated label lies on the rotated organ
