"""Datasets, one room for every command and study: Fashion-MNIST from its IDX files, any ImageFolder tree, ImageNet
(ImageFolder layout). A ``DataSpec`` names one; ``build_data`` gives its train/val sets (kdna train, kdna convert),
``eval_images`` its images without augmentation to measure on (kdna cka)."""
from __future__ import annotations

import gzip
import os
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from kdna_fx.adapters import ChildAdapter
from kdna_fx.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
# Mean and std of the Fashion-MNIST training pixels (scaled to [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("fashion-mnist", "folder", "imagenet")

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read an IDX file (optionally gzip-compressed, as the MNIST family ships) into a tensor.

    Layout: two zero bytes, a type code, the number of dimensions n, n big-endian uint32 sizes, then the data.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path!r}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path!r} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path!r}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path!r}: header promises shape {shape} ({expected} bytes of data) but the file holds "
                        f"{len(raw) - header}; the file is truncated or corrupt")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    # Native byte order and a writable copy: torch cannot wrap big-endian or read-only buffers.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | os.PathLike[str], array: np.ndarray, code: int = 0x08, gz: bool = True) -> None:
    """Write ``array`` as an IDX file (gzip-compressed unless ``gz=False``): the inverse of ``read_idx``."""
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    big = array.astype(array.dtype.newbyteorder(">"))
    with (gzip.open if gz else open)(os.fspath(path), "wb") as f:
        f.write(header + big.tobytes())


class TensorImages(Dataset):
    """Grey images held in memory as uint8 [N, H, W], returned as normalised float [1, H, W] and a label.

    ``augment`` adds a random 2-pixel translation and horizontal flip (the global torch RNG, so it is
    reproducible and saved in checkpoints).
    """

    def __init__(self, images: Tensor, labels: Tensor, *, augment: bool = False,
                 mean: float = FASHION_MNIST_MEAN, std: float = FASHION_MNIST_STD,
                 classes: tuple[str, ...] | None = None):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"expected images [N, H, W] and labels [N], got {tuple(images.shape)} and "
                            f"{tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.augment, self.mean, self.std = augment, mean, std
        self.classes = classes or tuple(str(i) for i in range(int(self.labels.max()) + 1))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.images[index].float().div_(255).sub_(self.mean).div_(self.std)[None]
        if self.augment:
            pad = 2
            h, w = x.shape[1:]
            padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-self.mean / self.std)
            top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
            x = padded[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, int(self.labels[index])


def fashion_mnist(root: str = FASHION_MNIST_DIR, *, train: bool = True, augment: bool | None = None) -> TensorImages:
    """The Fashion-MNIST train (60,000) or test (10,000) split, read from the IDX .gz files in ``root``."""
    prefix = "train" if train else "t10k"
    images_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    labels_path = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    missing = [p for p in (images_path, labels_path) if not os.path.exists(p)]
    if missing:
        hint = ("install the Debian package: `apt-get install -y dataset-fashion-mnist`"
                if os.path.abspath(root) == FASHION_MNIST_DIR else
                f"put {prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz in {root!r}, or "
                f"install the Debian package (`apt-get install -y dataset-fashion-mnist`) and drop --data")
        raise DataError(f"Fashion-MNIST files not found: {', '.join(missing)}; {hint}")
    images, labels = read_idx(images_path), read_idx(labels_path)
    return TensorImages(images.to(torch.uint8), labels, augment=train if augment is None else augment,
                        classes=FASHION_MNIST_CLASSES)


def _folder_transforms(image_size: int, train: bool, crop_scale: tuple[float, float]) -> Any:
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return T.Compose([T.RandomResizedCrop(image_size, scale=crop_scale), T.RandomHorizontalFlip(),
                          T.ToTensor(), normalize])
    # The usual 0.875 centre-crop ratio (256 -> 224).
    return T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor(), normalize])


def _load_image(path: str) -> Any:
    """torchvision's image loader, with a DataError naming a file that is not an image (one line, exit code 2)."""
    from PIL import Image, UnidentifiedImageError

    # Not just UnidentifiedImageError: other libraries patch PIL.Image.open process-wide (Ultralytics retries
    # through an optional HEIF plugin and raises ModuleNotFoundError when it is absent), and a file that fails to
    # decode is the same data error whichever opener is installed.
    try:
        with open(path, "rb") as f, Image.open(f) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ImportError, ValueError) as exc:
        raise DataError(f"{path!r} in the folder data set is not an image PIL can read ({type(exc).__name__}): "
                        f"remove it from the folder or convert it to PNG or JPEG") from None


def _image_folder(path: str, transform: Any) -> Any:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(path, transform=transform, loader=_load_image)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"cannot load {path!r} as an ImageFolder (one sub-folder per class holding images): "
                        f"{exc}") from None


class _Transformed(Dataset):
    """A view of an ImageFolder subset with its own transform (train and val halves of one folder differ)."""

    def __init__(self, base: Any, indices: list[int], transform: Any):
        self.base, self.indices, self.transform = base, indices, transform
        self.classes = base.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.base.samples[self.indices[i]]
        return self.transform(self.base.loader(path)), label


@dataclass(frozen=True)
class DataSpec:
    """A data set, as ``build_data`` takes it and ``kdna train`` stores it in its checkpoints."""

    dataset: str = "fashion-mnist"
    root: str | None = None
    """Where it is (``--data``): Fashion-MNIST's IDX folder (default FASHION_MNIST_DIR), an ImageFolder tree."""
    image_size: int | None = None
    val_fraction: float = 0.1
    train_subset: int | None = None
    val_subset: int | None = None

    def merged(self, **given: Any) -> DataSpec:
        """This spec with every field ``given`` that is not None (options typed over a run's data)."""
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})

    def build(self, seed: int = 0) -> DataBundle:
        """Its train/val sets (``build_data``)."""
        return build_data(**dataclasses.asdict(self), seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        """The spec ``to_dict`` wrote, or the data dict of a ``kdna train`` checkpoint of an older kdna_fx."""
        data = {("root" if k == "path" else k): v for k, v in data.items()}
        return cls().merged(**data)


@dataclass
class DataBundle:
    """Train and validation sets plus what the model needs to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    description: str


def build_data(dataset: str = "fashion-mnist", root: str | None = None, *, image_size: int | None = None,
               val_fraction: float = 0.1, seed: int = 0, train_subset: int | None = None,
               val_subset: int | None = None) -> DataBundle:
    """Build the train/val sets.

    ``fashion-mnist``: IDX files in ``root`` (default the Debian package directory); val is the test split.
    ``folder``: ImageFolder tree; ``root/train`` and ``root/val`` if both exist, else ``root`` split by
    ``val_fraction`` (seeded). ``imagenet``: ``root/train`` and ``root/val`` in ImageFolder layout, 224 crops.
    ``train_subset``/``val_subset`` keep a seeded random subset (quick runs).
    """
    if dataset == "fashion-mnist":
        root = root or FASHION_MNIST_DIR
        train, val = fashion_mnist(root, train=True), fashion_mnist(root, train=False)
        if image_size not in (None, 28):
            raise DataError("Fashion-MNIST images are 28x28; drop image_size= (--image-size): resizing is not "
                            "supported")
        bundle = DataBundle(train, val, 10, 1, f"Fashion-MNIST ({root})")
    elif dataset in ("folder", "imagenet"):
        if not root:
            raise DataError(f"dataset {dataset!r} needs root= (--data PATH: a folder with train/ and val/ "
                            f"sub-folders" + (")" if dataset == "imagenet" else ", or one ImageFolder tree to split)"))
        bundle = _folder_bundle(root, dataset, image_size, val_fraction, seed)
    else:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    bundle.train = _subset(bundle.train, train_subset, seed)
    bundle.val = _subset(bundle.val, val_subset, seed + 1)
    return bundle


def _folder_bundle(path: str, dataset: str, image_size: int | None, val_fraction: float, seed: int) -> DataBundle:
    imagenet = dataset == "imagenet"
    size = image_size or (224 if imagenet else 64)
    scale = (0.08, 1.0) if imagenet else (0.35, 1.0)
    train_dir, val_dir = os.path.join(path, "train"), os.path.join(path, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        train = _image_folder(train_dir, _folder_transforms(size, True, scale))
        val = _image_folder(val_dir, _folder_transforms(size, False, scale))
        if train.classes != val.classes:
            extra = sorted(set(train.classes) ^ set(val.classes))[:5]
            raise DataError(f"train/ and val/ under {path!r} have different class folders (e.g. {extra}); "
                            f"both need the same one-folder-per-class names")
        return DataBundle(train, val, len(train.classes), 3, f"{dataset} ({path}, {size}px)")
    if imagenet:
        raise DataError(f"ImageNet layout expected: {train_dir!r} and {val_dir!r}, one sub-folder per class "
                        f"(val images sorted into class folders)")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction= (--val-fraction) must be between 0 and 1, got {val_fraction}")
    base = _image_folder(path, None)
    order = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(val_fraction * len(base)))
    if n_val >= len(base):
        raise DataError(f"{path!r} has {len(base)} images: too few to split off a validation set")
    train = _Transformed(base, sorted(order[n_val:]), _folder_transforms(size, True, scale))
    val = _Transformed(base, sorted(order[:n_val]), _folder_transforms(size, False, scale))
    return DataBundle(train, val, len(base.classes), 3, f"folder ({path}, split {val_fraction:g}, {size}px)")


def _subset(data: Dataset, size: int | None, seed: int) -> Dataset:
    if size is None or size >= len(data):  # type: ignore[arg-type]
        return data
    if size < 1:
        raise DataError(f"a subset size must be >= 1, got {size}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:size]  # type: ignore[arg-type]
    return Subset(data, sorted(order.tolist()))


def eval_images(dataset: str = "fashion-mnist", root: str | None = None, *,
                image_size: int | None = None) -> tuple[Dataset, int, int, str]:
    """(images without augmentation, classes, channels, description) to measure a model on: the Fashion-MNIST
    test split, the val/ half of a train/val tree (ImageNet layout), or every image of one ImageFolder tree."""
    if dataset == "fashion-mnist":
        root = root or FASHION_MNIST_DIR
        return fashion_mnist(root, train=False), 10, 1, f"Fashion-MNIST test split ({root})"
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not root:
        raise DataError(f"dataset {dataset!r} needs root= (--data PATH: an ImageFolder tree, one sub-folder per "
                        f"class)")
    if dataset == "imagenet" or all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
        bundle = build_data(dataset, root, image_size=image_size)
        return bundle.val, bundle.num_classes, bundle.in_chans, f"{bundle.description}, val"
    size = image_size or 64
    folder = _image_folder(root, _folder_transforms(size, False, (0.35, 1.0)))
    return folder, len(folder.classes), 3, f"folder ({root}, {size}px)"


# ---- feeding images to a model (kdna_fx.cka, kdna_fx.calibrate) ---------------------------------------------------
def _batch(dims: int) -> str:
    return {1: "[N, C, L]", 2: "[N, C, H, W]", 3: "[N, C, D, H, W]"}[dims]


def as_images(item: Any, *, strict: bool = False, where: str = "data", dims: int = 2) -> Tensor:
    """The image batch [B, C, H, W] of one item of data: a batch, one image [C, H, W], or (images, labels, ...)
    whose labels are ignored. ``dims``: the spatial dims of the model's convs (1: signals [B, C, L], 3: volumes
    or clips [B, C, D, H, W]), which fix the rank of a batch.

    ``strict`` (calibration's contract) takes the item exactly as given: one image [C, H, W], integer images,
    a dict and an empty batch are refused, each with the fix in the message; ``where`` names the item there.
    """
    x = item[0] if isinstance(item, (tuple, list)) and item else item
    rank, batch = dims + 2, _batch(dims)
    if not strict:
        if not isinstance(x, Tensor) or x.ndim not in (rank - 1, rank):
            what = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            one = batch.replace("N, ", "")
            raise DataError(f"data must give images {batch.replace('N', 'B')} (or {one}), or (images, labels) pairs; "
                            f"got {what}")
        return x if x.ndim == rank else x[None]
    if isinstance(x, dict):
        raise DataError(f"{where} is a dict; data must yield image tensors {batch} or (images, labels) tuples")
    if not isinstance(x, Tensor):
        raise DataError(f"{where} is a {type(x).__name__}, not a tensor of images {batch} (nor an "
                        f"(images, labels) tuple)")
    if x.ndim != rank:
        raise DataError(f"{where} has shape {tuple(x.shape)}; images must be a {rank}-D batch {batch} (add the "
                        f"batch dimension with x.unsqueeze(0))")
    if not x.is_floating_point():
        raise DataError(f"{where} has dtype {x.dtype}; images must be floating point (convert with x.float() and "
                        f"the normalisation the model was trained with)")
    if x.shape[0] == 0:
        raise DataError(f"{where} is an empty batch (shape {tuple(x.shape)})")
    return x


def spatial_dims(model: torch.nn.Module) -> int:
    """The spatial dims of the inputs a model's convs take: 1, 2 or 3 (2 for a model without a conv)."""
    conv = next((m for m in model.modules() if isinstance(m, (torch.nn.modules.conv._ConvNd, ChildAdapter))), None)
    return 2 if conv is None else len(conv.kernel_size)


def image_batches(data: Any, images: int | None, batch_size: int, generator: torch.Generator | None, *,
                  min_batch: int = 1, strict: bool = False, dims: int = 2) -> tuple[Iterator[Tensor], int]:
    """Batches of ``batch_size`` images from ``data``, ``images`` in all (None: every image), and how many to
    expect (an upper bound; 0 when unknown).

    ``data``: images [N, C, H, W] or a map-style data set (``images`` drawn at random with ``generator``, in
    order without one), or any iterable such as a DataLoader (its first ``images``, in its order). A last batch
    smaller than ``min_batch`` joins the one before it.

    ``strict`` (calibration's contract: the data used exactly as given, every item checked by ``as_images``):
    a tensor is cut into ``batch_size`` batches as above, but any other iterable, a list included, is read in
    its own order with its batches as they come (not drawn from, not re-cut); anything else is refused.
    ``dims``: the spatial dims of the model's convs (``spatial_dims``), as in ``as_images``.
    """
    if isinstance(data, Tensor):
        if strict:
            as_images(data, strict=True, dims=dims)
        elif data.ndim != dims + 2:
            raise DataError(f"a tensor of images must be {_batch(dims)}, got shape {tuple(data.shape)}")
        order = _order(len(data), generator)[:images]
        stream: Iterable[Tensor] = (data[order[i:i + batch_size]] for i in range(0, len(order), batch_size))
        if strict:  # already cut to batch_size: nothing to re-cut
            return iter(stream), len(order)
        expected = len(order)
    elif strict:
        if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise DataError(f"data must be a tensor of images {_batch(dims)} or an iterable (a DataLoader) of them, "
                            f"got {type(data).__name__}")
        checked = (as_images(x, strict=True, where=f"data item #{i}", dims=dims) for i, x in enumerate(data))
        return _first(checked, images), images or 0
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, DataLoader):
        drawn = _order(len(data), generator)[:images].tolist()
        stream, expected = (as_images(data[i], dims=dims) for i in drawn), len(drawn)
    else:
        stream, expected = (as_images(x, dims=dims) for x in data), images or 0
    return rebatch(stream, images, batch_size, min_batch), expected


def _order(n: int, generator: torch.Generator | None) -> Tensor:
    """0..n-1 shuffled by ``generator``, or in order without one (a pass that only measures)."""
    return torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)


def _first(stream: Iterable[Tensor], images: int | None) -> Iterator[Tensor]:
    """The batches of ``stream`` up to ``images`` images in all (None: all of them), the last one cut short."""
    taken = 0
    for x in stream:
        x = x if images is None else x[: images - taken]
        taken += len(x)
        yield x
        if images is not None and taken >= images:
            return  # before reading another item: a DataLoader would load one more batch for nothing


def rebatch(stream: Iterable[Tensor], images: int | None, batch_size: int, min_batch: int = 1) -> Iterator[Tensor]:
    """Re-cut ``stream`` into batches of ``batch_size``, up to ``images`` images in all (None: all of them); a
    remainder smaller than ``min_batch`` joins the batch before it."""
    held: Tensor | None = None
    buffer: list[Tensor] = []
    for x in _first(stream, images):
        buffer.append(x)
        while sum(len(b) for b in buffer) >= batch_size:
            whole = torch.cat(buffer)
            buffer = [whole[batch_size:]]
            if held is not None:
                yield held
            held = whole[:batch_size]
    rest = torch.cat(buffer) if buffer else None
    if rest is not None and len(rest):
        if held is not None and len(rest) < min_batch:
            held = torch.cat([held, rest])
        else:
            if held is not None:
                yield held
            held = rest
    if held is not None:
        yield held
