"""Measuring a model: run it on images and collect the Gram matrix of every conv's output, transformed models
included (a child is a ChildAdapter module, watched by a hook like any conv)."""
from __future__ import annotations

import contextlib
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from kdna_fx.adapters import ChildAdapter
from kdna_fx.data import image_batches, spatial_dims
from kdna_fx.datamodel import module_form
from kdna_fx.errors import CKAError
from kdna_fx.utils import KeptModes, device_dtype

from .estimators import MinibatchCKA, gram
from .similarity import LayerSimilarity, did_you_mean

Pool = Literal["flatten", "mean"]
POOLS = ("flatten", "mean")


def _conv_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The convs the model runs: conv modules (1-D, 2-D, 3-D) and, in a transformed model, its children."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, ChildAdapter))]


def layer_similarity(model: nn.Module, data: Any, layers: Sequence[str] | None = None, *, images: int = 512,
                     pool: Pool = "flatten", batch_size: int = 64, seed: int = 0,
                     progress: bool = True) -> LayerSimilarity:
    """Linear CKA (minibatch, unbiased HSIC) between the outputs of the model's convs on ``data``.

    ``data``: images [N, C, H, W] (``images`` of them drawn with ``seed``), a map-style data set of images or
    (image, label) pairs (likewise), or any iterable such as a DataLoader of image batches or (images, labels)
    (the first ``images``). ``layers``: conv names to keep (default: every conv module, and every child conv of a
    model transformed by kdna_fx, under its original name). Layers come in the order they run. ``pool``:
    "flatten" compares whole feature maps, "mean" their spatial means [n, C]. The model runs in eval mode
    without gradients; its training flags are restored afterwards.
    """
    if pool not in POOLS:
        raise CKAError(f"pool must be 'flatten' (whole feature maps) or 'mean' (spatial means), got {pool!r}")
    if images < 4 or batch_size < 4:
        raise CKAError(f"images ({images}) and batch_size ({batch_size}) must both be >= 4: the unbiased HSIC "
                       f"estimator divides by n - 3")
    model = module_form(model)  # a graph form (passes.lower) is measured through the model it shares tensors with
    available = [n for n, _ in _conv_modules(model)]
    if not available:
        raise CKAError(f"{type(model).__name__} has no conv module (nor kdna_fx child conv) to compare")
    wanted = None if layers is None else list(layers)
    if wanted is not None and not wanted:
        raise CKAError("layers is empty; pass conv names to compare, or None for every conv")
    for name in wanted or ():
        if name not in available:
            raise CKAError(f"no conv named {name!r} in the model{did_you_mean(name, available)} "
                           f"(convs are named by module path, e.g. {available[0]!r})")

    grams: dict[str, Tensor] = {}

    def record(name: str, output: Tensor) -> None:
        if wanted is not None and name not in wanted:
            return
        key, k = name, 2
        while key in grams:  # a conv module run twice in one forward: one layer per call
            key, k = f"{name}#{k}", k + 1
        features = output.mean((2, 3)) if pool == "mean" else output
        grams[key] = gram(features)

    device, dtype = device_dtype(model)
    watched = contextlib.ExitStack()
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: record(name, o))
             for name, m in _conv_modules(model)]
    watched.enter_context(KeptModes(model))
    estimator, names, count = MinibatchCKA(), None, 0
    try:
        from tqdm.auto import tqdm

        model.eval()
        generator = torch.Generator().manual_seed(seed)
        # DataLoaders shuffle with the global RNG: seed it, and leave the caller's RNG as it was.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            # The unbiased HSIC divides by n - 3: a remainder of fewer than 4 images joins the batch before it.
            batches, expected = image_batches(data, images, batch_size, generator, min_batch=4,
                                              dims=spatial_dims(model))
            with tqdm(total=expected, desc="cka", unit="img", disable=not progress, leave=False) as bar:
                for x in batches:
                    if len(x) < 4:  # only ever the sole batch: image_batches merges short remainders
                        raise CKAError(f"data gave {len(x)} images; the unbiased HSIC needs at least 4")
                    grams.clear()
                    x = x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
                    model(x)
                    if names is None:
                        names = list(grams)
                    elif list(grams) != names:
                        raise CKAError(f"the convs that ran changed between batches ({names} then {list(grams)}): "
                                       f"CKA needs every layer's output for every image")
                    estimator.update_grams([grams[n] for n in names])
                    count += len(x)
                    bar.update(len(x))
    finally:
        watched.close()
        for h in hooks:
            h.remove()
    if names is None:
        raise CKAError("data gave no images; pass a tensor [N, C, H, W] or a non-empty DataLoader")
    if wanted is not None:
        missing = [n for n in wanted if n not in names]
        if missing:
            raise CKAError(f"conv(s) {missing} did not run in the model's forward: they have no output to compare")
    return LayerSimilarity(names, estimator.matrix(), pool, count)
