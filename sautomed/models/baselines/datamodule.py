"""The baselines' data: the shared data module, with 3D patches for training when `patches` is set.

unet2d trains on the shared slice windows as they are (`unet2d.window_slices` takes the target and its
neighbours); unet3d trains on `PatchDataset` patches. Validation, test and predict are the shared
whole-volume batches either way, so metrics and outputs are the same as every other family's.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from sautomed.data.datamodule import SegmentationDataModule, WindowBatchSampler
from sautomed.errors import UserError
from sautomed.models.baselines.patches import PatchDataset, Patches


class BaselineDataModule(SegmentationDataModule):
    """`SegmentationDataModule` (every argument of it), plus:

    Args:
        patches: if set, training batches are 3D patches (B, C, pz, py, px) with labels (B, pz, py, px)
            (unet3d); if null, the shared slice windows (unet2d).
        channels: input channels C per case, nnU-Net's ``case_0000``, ``case_0001`` ... files of the nnunet
            layout, checked to share one grid (= ``model.unet.in_channels``; unet3d only).
    """

    def __init__(self, *args: Any, patches: Patches | None = None, channels: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.patches = patches
        self.channels = channels

    def train_dataloader(self) -> DataLoader:
        if self.patches is None:
            return super().train_dataloader()
        volumes = [self.cache.get(self.layout, c, self.preprocessing) for c in self.train_cases]
        unlabeled = [v.case_id for v in volumes if v.label is None]
        if unlabeled:
            raise UserError(f"training cases without labels: {', '.join(unlabeled)}")
        ds = PatchDataset(volumes, self.patches, self.seed, self.augmentation)
        # the windows' seeded, resumable, DDP-sharded batches of (epoch, item, n) keys; n is unused here
        sampler = WindowBatchSampler(len(ds), self.batch_size, (1, 1), self.seed)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers)
