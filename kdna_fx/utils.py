"""Small helpers every room uses, one of each: atomic writes, train/eval modes kept, a model's device and dtype."""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[str]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block succeeds, removed when
    it raises. A crash or an error never leaves a half-written file at ``path`` (nor a stale one replaced).
    ``suffix``: the temporary name's ending (a reader may go by it, as torch.export.load does for .pt2)."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically (see ``atomic_path``): a stopped job never leaves a
    half-written file that a resume would trust. Values JSON cannot hold are written as their ``str``."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


class KeptModes:
    """On exit every module of ``modules`` gets back its own train/eval flag as it was on entry (a plain
    ``model.train(was)`` would reset every submodule, frozen BatchNorms included)."""

    def __init__(self, *modules: nn.Module):
        self.saved = [(m, m.training) for root in modules for m in root.modules()]

    def __enter__(self) -> "KeptModes":
        return self

    def __exit__(self, *exc: object) -> None:
        for m, training in self.saved:
            m.training = training


def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """Where ``model``'s first floating-point tensor lives and its dtype: parameters first, then buffers (a
    model of frozen buffers still says where it runs). CPU and None for a model without one; callers that need
    a dtype take ``torch.get_default_dtype()`` then. Integer tensors (counters, indices) say nothing of the
    dtype images should have, so they are skipped."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    first = next((t for t in tensors if t.is_floating_point()), None)
    return (first.device, first.dtype) if first is not None else (torch.device("cpu"), None)


def to_model(inputs: Any, model: nn.Module) -> Any:
    """``inputs`` (a tensor, or a list/tuple of tensors) moved to ``model``'s device and floating dtype."""
    device, dtype = device_dtype(model)

    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    return type(inputs)(move(t) for t in inputs) if isinstance(inputs, (list, tuple)) else move(inputs)
