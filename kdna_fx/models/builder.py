"""The builder stamp: how a model was built, so that a checkpoint can rebuild it (``kdna_fx.load(path)``).

Every model ``create_model`` returns carries ``{"name": <canonical name>, "kwargs": {...}, "input": {...}}``
(JSON-able: a KDNAConfig is stored as its dict; ``input``: the channels and image size it is made for, see
``input_of``) in one attribute that travels with the model (kdna_fx/carried.py): it survives
``kdna_fx.transform`` (both paths), pickle, torch.save, ``copy.deepcopy`` and ``copy.copy``. Options that JSON
cannot hold (a class, a module) leave the model unstamped.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from torch import nn

from ..carried import keep, kept
from ..config import KDNAConfig
from ..errors import StateError

BUILDER_ATTR = "_kdna_builder"
_CONFIG_KEY = "__kdna_config__"
# The ImageNet form's input: what a zoo model without a small stem, and a torchvision classifier, are made for.
IMAGENET_SIZE, IMAGENET_CHANNELS = 224, 3


def _encode(value: Any) -> Any:
    """``value`` as JSON data; TypeError where JSON cannot hold it."""
    if isinstance(value, KDNAConfig):
        return {_CONFIG_KEY: value.to_dict()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_CONFIG_KEY}:
            return KDNAConfig.from_dict(value[_CONFIG_KEY])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def stamp(model: nn.Module, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Record on ``model`` that it is ``create_model(name, **kwargs)`` (nothing when JSON cannot hold the
    kwargs); returns ``model``."""
    # A small stem is for small images of no one size (Fashion-MNIST's 28, CIFAR's 32): left to record_input.
    size = None if kwargs.get("small_stem") else IMAGENET_SIZE
    try:
        builder = {"name": name, "kwargs": _encode(kwargs),
                   "input": {"in_chans": int(kwargs.get("in_chans", IMAGENET_CHANNELS)), "image_size": size}}
        json.dumps(builder)
    except (TypeError, ValueError):
        return model
    keep(model, BUILDER_ATTR, builder)
    return model


def builder_of(model: object) -> dict[str, Any] | None:
    """How ``model`` was built: ``{"name": ..., "kwargs": {...}}`` (a copy), so that
    ``create_model(b["name"], **b["kwargs"])`` rebuilds it (use ``rebuild`` where kwargs hold a KDNAConfig);
    None for a model ``create_model`` did not build. Looks inside a ``torch.compile`` wrapper."""
    if not isinstance(model, nn.Module):
        return None
    builder = kept(model, BUILDER_ATTR)
    return None if builder is None else copy.deepcopy(builder)


def record_input(model: nn.Module, *, image_size: int | None = None, in_chans: int | None = None) -> None:
    """Record on ``model``'s stamp the input it is made for (the data it was trained or calibrated on), so that
    a ``kdna_fx.save`` file of it exports at that size (``kdna export``); nothing for an unstamped model."""
    builder = builder_of(model)
    if builder is None:
        return
    given = {"image_size": image_size, "in_chans": in_chans}
    builder["input"] = {**builder.get("input", {}), **{k: int(v) for k, v in given.items() if v is not None}}
    keep(model, BUILDER_ATTR, builder)


def input_of(builder: dict[str, Any] | None) -> dict[str, int | None]:
    """``{"in_chans": ..., "image_size": ...}`` a stamp (``builder_of``, or a saved file's) records; None where it
    does not say (a stamp written before inputs were recorded, or a small-stem model never trained)."""
    recorded = (builder or {}).get("input") or {}
    return {"in_chans": recorded.get("in_chans"), "image_size": recorded.get("image_size")}


def rebuild(builder: dict[str, Any]) -> nn.Module:
    """A fresh model from a stamp (``builder_of``), through ``create_model``."""
    from ._registry import create_model

    if not isinstance(builder, dict) or not isinstance(builder.get("name"), str) \
            or not isinstance(builder.get("kwargs", {}), dict):
        raise StateError(f"a builder stamp is {{'name': str, 'kwargs': dict}}, got {builder!r}")
    return create_model(builder["name"], **_decode(builder.get("kwargs", {})))
