"""Fashion-MNIST scenes: a detection and instance-segmentation data set with known ground truth, nothing to download.

Each scene pastes a few garments at random positions and sizes on a black canvas. Boxes and masks come from the
pasted pixels themselves, so they are exact: a garment's mask is its nonzero pixels after scaling, minus whatever
a later garment covers, and a garment covered completely is dropped. Scenes are generated on the fly from
``(seed, index)``, so the same index always gives the same scene and nothing is written to disk::

    train = FashionScenes("train", seed=0)            # garments from the 60,000 training images
    val = FashionScenes("val", length=500, seed=0)    # garments from the 10,000 test images
    loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate)
    images, targets = next(iter(loader))              # what torchvision's detection models take

Targets follow torchvision's detection convention: ``boxes`` float [N, 4] (x1, y1, x2, y2), ``labels`` int64 [N]
(garment class + 1, 0 being the background), ``masks`` uint8 [N, H, W], plus ``image_id`` (the scene index).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from kdna_fx.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, DataError, fashion_mnist

SPLITS = {"train": True, "val": False}  # split -> Fashion-MNIST's train flag (val scenes use the test images)
SCENE_CLASSES = ("background",) + FASHION_MNIST_CLASSES

Target = dict[str, Tensor]


@functools.lru_cache(maxsize=4)
def _garments(root: str, train: bool) -> tuple[Tensor, Tensor]:
    # Reading the IDX files takes about a second; every scene set of a process shares one copy.
    split = fashion_mnist(root, train=train, augment=False)
    return split.images, split.labels


class FashionScenes(Dataset):
    """Scenes of ``objects`` garments (a range, inclusive) of ``garment_size`` pixels a side (a range, inclusive)
    on a ``size`` x ``size`` canvas, in ``channels`` identical grey channels scaled to [0, 1].

    ``split`` "train" takes garments from Fashion-MNIST's training images, "val" from its test images.
    ``length`` is the number of scenes (any number: scenes are generated from their index); by default the number
    of images in the split, 60,000 or 10,000. Garments are pasted in order and stay whole inside the canvas;
    later garments occlude earlier ones.

    Boxes are in pixel-edge coordinates: a garment whose visible pixels span columns 3..9 has x1 = 3, x2 = 10,
    so every box is at least one pixel wide and high, as torchvision's detectors require.
    """

    def __init__(self, split: str = "train", *, size: int = 128, objects: tuple[int, int] = (1, 4),
                 garment_size: tuple[int, int] = (20, 64), length: int | None = None, seed: int = 0,
                 channels: int = 1, root: str = FASHION_MNIST_DIR):
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
        lo, hi = _range("objects", objects)
        if lo < 1:
            raise DataError(f"objects must be at least 1 per scene, got {objects}")
        small, large = _range("garment_size", garment_size)
        if small < 1:
            raise DataError(f"garment_size must be at least 1 pixel, got {garment_size}")
        if not isinstance(size, int) or size < large:
            raise DataError(f"size must be an int no smaller than the largest garment ({large} px), got {size!r}")
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3 (grey, or grey repeated as RGB), got {channels!r}")
        if length is not None and (not isinstance(length, int) or length < 1):
            raise DataError(f"length must be a positive int (or None for the split's size), got {length!r}")
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be a non-negative int, got {seed!r}")
        self.split, self.size, self.objects, self.garment_size = split, size, (lo, hi), (small, large)
        self.seed, self.channels, self.root = seed, channels, root
        self.images, self.garment_labels = _garments(root, SPLITS[split])
        self.length = len(self.images) if length is None else length
        self.classes = SCENE_CLASSES

    @property
    def num_classes(self) -> int:
        """Garment classes plus the background: what torchvision's detectors take as ``num_classes``."""
        return len(SCENE_CLASSES)

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        (lo, hi), (small, large) = self.objects, self.garment_size
        return (f"FashionScenes(split={self.split!r}, {self.length:,} scenes of {self.size}x{self.size}, "
                f"{lo}-{hi} garments of {small}-{large} px, channels={self.channels}, seed={self.seed})")

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"scene index must be an int, got {type(index).__name__}")
        if not -self.length <= index < self.length:
            raise IndexError(f"scene {index} out of range for {self.length} scenes")
        index = int(index) % self.length
        # One independent stream per (seed, index): any scene can be made alone, in any order, by any worker.
        rng = np.random.default_rng([self.seed, index])
        canvas = torch.zeros(self.size, self.size)
        masks: list[Tensor] = []
        labels: list[int] = []
        for _ in range(int(rng.integers(self.objects[0], self.objects[1] + 1))):
            source = int(rng.integers(len(self.images)))
            side = int(rng.integers(self.garment_size[0], self.garment_size[1] + 1))
            top, left = (int(v) for v in rng.integers(0, self.size - side + 1, size=2))
            garment = _resize(self.images[source], side)
            mask = torch.zeros(self.size, self.size, dtype=torch.bool)
            mask[top:top + side, left:left + side] = garment > 0
            canvas[mask] = garment[garment > 0].float() / 255
            for earlier in masks:
                earlier &= ~mask
            masks.append(mask)
            labels.append(int(self.garment_labels[source]) + 1)
        keep = [i for i, m in enumerate(masks) if m.any()]
        mask_stack = (torch.stack([masks[i] for i in keep]) if keep
                      else torch.zeros(0, self.size, self.size, dtype=torch.bool))
        target = {"boxes": mask_boxes(mask_stack),
                  "labels": torch.tensor([labels[i] for i in keep], dtype=torch.int64),
                  "masks": mask_stack.to(torch.uint8), "image_id": torch.tensor(index)}
        return canvas.expand(self.channels, -1, -1).clone(), target


def _range(name: str, value: Any) -> tuple[int, int]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise DataError(f"{name} must be a (low, high) pair of ints, got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or lo > hi:
        raise DataError(f"{name} must be a (low, high) pair of ints with low <= high, got {value!r}")
    return lo, hi


def _resize(image: Tensor, side: int) -> Tensor:
    """A uint8 [28, 28] garment resized to [side, side], rounded back to uint8 (so "nonzero" stays exact)."""
    out = F.interpolate(image[None, None].float(), size=(side, side), mode="bilinear", align_corners=False,
                        antialias=side < image.shape[-1])
    return out[0, 0].round().clamp(0, 255).to(torch.uint8)


def mask_boxes(masks: Tensor) -> Tensor:
    """Pixel-edge (x1, y1, x2, y2) boxes of boolean or 0/1 masks [N, H, W]: the last row and column are included,
    so x2 = last column + 1. Every mask must have at least one pixel."""
    boxes = torch.zeros(len(masks), 4)
    for i, mask in enumerate(masks.bool()):
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        if len(rows) == 0:
            raise DataError(f"mask {i} is empty: it has no box")
        boxes[i] = torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float()
    return boxes


def collate(batch: list[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """A DataLoader batch as torchvision's detection models take it: a list of images and a list of targets."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
