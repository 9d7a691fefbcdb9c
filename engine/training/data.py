"""Training data: chips read from the image stack by window, with their label chips.

Labels are held in memory as class-index windows of the image grid (int16, only where labels
are: ``LabelMask``); image chips are read from disk on demand, so the image itself never has
to fit in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from rasterio.windows import Window
from torch.utils.data import DataLoader, Dataset

from engine.data.chips import normalise, tile_starts, window_counts
from engine.data.labels import LabelMask
from engine.data.rasters import RasterStack


@dataclass
class ChipSource:
    """What a worker needs to read chips (plain data: picklable for worker processes)."""

    images: list[str]
    bands: list[int]
    mean: list[float]
    std: list[float]


class ChipDataset(Dataset):
    """Chips on fixed ``windows`` (validation); labels outside ``target`` (-1) are ignored."""

    def __init__(self, source: ChipSource, windows: list[Window], target: LabelMask):
        self.source = source
        self.windows = windows
        self.target = target
        self._stack: RasterStack | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def _read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        if self._stack is None:  # opened lazily, once per worker process
            self._stack = RasterStack(self.source.images, self.source.bands)
        data, valid = self._stack.read(window)
        x = normalise(data, valid, self.source.mean, self.source.std)
        y = self.target.crop(window).astype(np.int64)
        y[~valid] = -1
        return x, y

    def __getitem__(self, i: int):
        x, y = self._read(self.windows[i])
        return torch.from_numpy(x), torch.from_numpy(y)


class RandomCrops(ChipDataset):
    """Training chips: each item is a crop at a random one of ``positions`` (see
    ``engine.data.chips.crop_positions``) with a random D4 flip/rotation, so every epoch sees
    new crops over the whole labelled area instead of the same fixed grid."""

    def __init__(self, source: ChipSource, positions: np.ndarray, target: LabelMask, size: int, length: int):
        super().__init__(source, [], target)
        self.positions = positions
        self.size = size
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        # torch's generator: seeded per worker by Lightning (seed_everything(workers=True)).
        r, c = self.positions[torch.randint(len(self.positions), (1,)).item()]
        x, y = self._read(Window(int(c), int(r), self.size, self.size))
        k, flip = torch.randint(0, 4, (1,)).item(), torch.randint(0, 2, (1,)).item()
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        if flip:
            x, y = x[:, :, ::-1], y[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def labelled_windows(target: LabelMask, size: int, stride: int) -> list[Window]:
    """Windows of the tiling rule holding at least one labelled pixel (validation chips)."""
    positions, counts = window_counts([target], tile_starts(target.height, size, stride),
                                      tile_starts(target.width, size, stride), size)
    return [Window(int(c), int(r), size, size) for (r, c), n in zip(positions, counts[:, 0]) if n > 0]


class ChipDataModule(L.LightningDataModule):
    def __init__(self, train: ChipDataset, val: ChipDataset | None, batch_size: int, workers: int = 0):
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size = batch_size
        self.workers = workers

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=False,
                          num_workers=self.workers, persistent_workers=self.workers > 0)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.workers, persistent_workers=self.workers > 0)
