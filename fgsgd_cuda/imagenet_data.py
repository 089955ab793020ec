"""Data of :mod:`fgsgd_cuda.train_imagenet`: ImageNet in ImageFolder layout, or synthetic images; samplers.

- :func:`imagefolder_datasets`: ``DIR/train`` and ``DIR/val``, one folder per class (torchvision's
  ``ImageFolder``); train: RandomResizedCrop + horizontal flip + normalize, val: Resize(size·256/224) +
  CenterCrop + normalize. torchvision is imported inside the function.
- :class:`SyntheticImages`: random images made on the fly, no disk and no torchvision. Item i is a function of
  (seed, split, i) alone, so each rank's shard (and a resumed run) sees the same data. Each class shifts the
  mean of every colour channel by a fixed random amount (a function of the seed: the same in the training and
  the validation split), so a model can learn something from them.
- :class:`ShardSampler`: rank r of w reads items r, r + w, r + 2w, ... of the validation set: no padding
  (``DistributedSampler`` repeats items to even the shards, which would count them twice in the metrics).
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, split, index) over the generator's seeds


class SyntheticImages(Dataset):
    """``size`` images of shape (3, image_size, image_size), float32, with labels in [0, num_classes):
    item i = N(0, 1) noise + a per-class mean per channel, from a generator seeded by (seed, split, i)."""

    def __init__(self, size: int, image_size: int, num_classes: int, seed: int = 0, split: int = 0):
        self.size, self.image_size, self.num_classes = int(size), int(image_size), int(num_classes)
        self.seed, self.split = int(seed), int(split)
        gen = torch.Generator().manual_seed(self.seed * _MIX % (2 ** 63))  # the same classes in every split
        self.class_means = 0.5 * torch.randn(self.num_classes, 3, generator=gen)

    def _seed_of(self, index: int) -> int:
        return ((self.seed * _MIX + self.split + 1) * _MIX + index) % (2 ** 63)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self._seed_of(index))
        label = int(torch.randint(self.num_classes, (), generator=gen))
        x = torch.randn(3, self.image_size, self.image_size, generator=gen)
        return x.add_(self.class_means[label].view(3, 1, 1)), label


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... of a dataset of ``size`` items: every item once over all ranks."""

    def __init__(self, size: int, rank: int, world: int):
        self.size, self.rank, self.world = size, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))


def imagefolder_datasets(root: str, image_size: int = 224) -> tuple[Dataset, Dataset]:
    """(train, val) ``ImageFolder`` datasets of ``root/train`` and ``root/val`` with the standard transforms."""
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = datasets.ImageFolder(f"{root}/train", transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        normalize]))
    val = datasets.ImageFolder(f"{root}/val", transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size), transforms.ToTensor(),
        normalize]))
    if val.classes != train.classes:
        raise ValueError(f"{root}: train/ has {len(train.classes)} classes, val/ {len(val.classes)}, or other names")
    return train, val


def datasets_for(args) -> tuple[Dataset, Dataset]:
    """(train, val) of the parsed command line: synthetic or ImageFolder."""
    if args.synthetic:
        return (SyntheticImages(args.synthetic_size, args.image_size, args.num_classes, args.seed, split=0),
                SyntheticImages(args.synthetic_val_size, args.image_size, args.num_classes, args.seed, split=1))
    return imagefolder_datasets(args.data, args.image_size)
