"""The training data stream: a deterministic, resumable, rank-sharded sampler and its DataLoader.

Iteration t of a run with global batch B always sees the same B images with the same augmentations,
whatever the number of processes and whether the run was resumed: the index stream is one random
permutation per epoch (seeded by the run's seed and the epoch), rank r of W takes its B/W slice of each
global batch, and every sample's augmentation is seeded by its position in the stream.
"""

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from m2f.config import Config


class TrainSampler(Sampler[list[tuple[int, int]]]):
    """Yields, forever, this rank's share of each global batch as [(dataset index, augmentation seed)].

    Args:
        dataset_size: number of images.
        global_batch: B, images per iteration over all processes (divisible by world_size).
        rank / world_size: this process and the process count.
        seed: the run's seed.
        start_iter: the first iteration to produce (resume).
    """

    def __init__(self, *, dataset_size: int, global_batch: int, rank: int, world_size: int, seed: int,
                 start_iter: int = 0):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size={global_batch} must be divisible by the {world_size} processes")
        if dataset_size == 0:
            raise ValueError("the training set is empty")
        self.size, self.global_batch, self.seed = dataset_size, global_batch, seed
        self.local_batch, self.rank, self.start_iter = global_batch // world_size, rank, start_iter

    def _stream_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return int(perm[offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start_iter
        while True:
            first = iteration * self.global_batch + self.rank * self.local_batch
            positions = range(first, first + self.local_batch)
            yield [(self._stream_index(p), self.seed * 1_000_003 + p) for p in positions]
            iteration += 1

    def __len__(self) -> int:  # an endless stream; DataLoader only needs len() for warnings
        return 2**31


class SeededDataset(Dataset):
    """Calls `dataset[index]` with every RNG seeded from the sample's seed, leaving the caller's RNGs
    untouched (so num_workers=0 does not disturb the training RNG, which resume relies on)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)

    def __getattr__(self, name: str) -> Any:  # categories, skip_summary() of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_lists(batch: list[dict[str, Any]]
                  ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list[tuple[str, str]]]:
    """Keeps images at their own sizes (the model pads them) and targets as per-image dicts.

    Returns:
        (images, targets, skipped): `skipped` gathers the `(file, problem)` pairs of images the dataset
        skipped to produce these items (inside DataLoader workers, where the training loop cannot see
        the dataset's own record).
    """
    return ([b["image"] for b in batch], [{"labels": b["labels"], "masks": b["masks"]} for b in batch],
            [tuple(pair) for b in batch for pair in b.get("skipped", [])])


def pad_targets(targets: list[dict[str, torch.Tensor]], size: tuple[int, int], device: torch.device
                ) -> list[dict[str, torch.Tensor]]:
    """Pads every target mask (G, H, W) with False to the model's padded input size (G, *size)."""
    out = []
    for t in targets:
        masks = t["masks"]
        padded = masks.new_zeros((masks.shape[0], *size))
        padded[:, : masks.shape[1], : masks.shape[2]] = masks
        out.append({"labels": t["labels"].to(device), "masks": padded.to(device)})
    return out


def build_train_loader(cfg: Config, *, rank: int, world_size: int, start_iter: int = 0) -> DataLoader:
    """The training DataLoader of `cfg.data` (dataset, LSJ/crop augmentation, sharded seeded sampler)."""
    from m2f.data import build_dataset, build_train_transforms

    d = cfg.data
    transforms = build_train_transforms(task=d.task, image_size=d.image_size, min_scale=d.min_scale,
                                        max_scale=d.max_scale)
    # As the original: images without annotations are left out; unreadable ones are skipped and reported.
    dataset = build_dataset(d.format, d.root, d.train_split, task=d.task, transforms=transforms, skip_bad=True,
                            filter_empty=True)
    check_num_classes(dataset, cfg)
    sampler = TrainSampler(dataset_size=len(dataset), global_batch=cfg.train.batch_size, rank=rank,
                           world_size=world_size, seed=cfg.train.seed, start_iter=start_iter)
    return DataLoader(SeededDataset(dataset), batch_sampler=sampler, num_workers=d.num_workers,
                      collate_fn=collate_lists, persistent_workers=d.num_workers > 0,
                      generator=torch.Generator().manual_seed(cfg.train.seed))


def check_num_classes(dataset: Any, cfg: Config) -> None:
    """The classifier size must match the dataset's categories; say how to fix it when it does not."""
    num = len(dataset.categories)
    if num != cfg.model.num_classes:
        raise ValueError(f"the dataset at {cfg.data.root} has {num} categories but model.num_classes="
                         f"{cfg.model.num_classes}; add --set model.num_classes={num}")
