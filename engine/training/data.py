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
from torch.utils.data import DataLoader, Dataset, Sampler

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
    new crops over the whole labelled area instead of the same fixed grid.

    Item ``k`` (``EpochIndices`` yields ``epoch * length + i``) draws from its own generator
    seeded by ``(seed, k)``: the chips of an epoch depend on the seed and the epoch alone, not on
    the global random state, the worker or what ran before, so a resumed run sees the same ones."""

    def __init__(self, source: ChipSource, positions: np.ndarray, target: LabelMask, size: int, length: int,
                 seed: int = 0):
        super().__init__(source, [], target)
        self.positions = positions
        self.size = size
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, int(i)])
        r, c = self.positions[rng.integers(len(self.positions))]
        x, y = self._read(Window(int(c), int(r), self.size, self.size))
        k, flip = int(rng.integers(4)), int(rng.integers(2))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        if flip:
            x, y = x[:, :, ::-1], y[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


class EpochIndices(Sampler):
    """The item numbers of one epoch of ``RandomCrops``: ``epoch * length + i``. Lightning calls
    ``set_epoch`` at each epoch start (also through its distributed wrapper); ``epoch`` is read
    when iteration starts. ``epoch`` given: where a resumed run starts."""

    def __init__(self, length: int, epoch: int = 0):
        self.length = length
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        start = self.epoch * self.length
        return iter(range(start, start + self.length))


def labelled_windows(target: LabelMask, size: int, stride: int) -> list[Window]:
    """Windows of the tiling rule holding at least one labelled pixel (validation chips)."""
    positions, counts = window_counts([target], tile_starts(target.height, size, stride),
                                      tile_starts(target.width, size, stride), size)
    return [Window(int(c), int(r), size, size) for (r, c), n in zip(positions, counts[:, 0]) if n > 0]


class ChipDataModule(L.LightningDataModule):
    def __init__(self, train: ChipDataset, val: ChipDataset | None, batch_size: int, workers: int = 0,
                 start_epoch: int = 0):
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size = batch_size
        self.workers = workers
        self.start_epoch = start_epoch  # a resumed run: the epoch it continues with

    def train_dataloader(self):
        if isinstance(self.train_set, RandomCrops):
            # Random crops: the items are random already; their numbers say which epoch they are
            # in. The loader's own generator (worker seeds) leaves the global random state alone.
            return DataLoader(self.train_set, batch_size=self.batch_size, drop_last=False,
                              sampler=EpochIndices(len(self.train_set), self.start_epoch),
                              generator=torch.Generator().manual_seed(self.train_set.seed),
                              num_workers=self.workers, persistent_workers=self.workers > 0)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=False,
                          num_workers=self.workers, persistent_workers=self.workers > 0)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        # its own generator too: Lightning starts (and on resuming fast-forwards) this loader at
        # other moments than a run never stopped; the global random state must not see it
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False,
                          generator=torch.Generator().manual_seed(0),
                          num_workers=self.workers, persistent_workers=self.workers > 0)
