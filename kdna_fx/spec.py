"""``ModelSpec(name, kwargs)``: how a model is built, the one record that checkpoints, ``kdna_fx.save`` files, the
commands' sources, ``kdna train`` runs and bench rows store and rebuild from (``spec.build()``).

Every model ``kdna_fx.models.create_model`` returns carries its spec (``spec_of``) in one attribute that travels
with the model (kdna_fx/carried.py): it survives ``kdna_fx.transform``, pickle, torch.save,
``copy.deepcopy`` and ``copy.copy``. Options that JSON cannot hold (a class, a module) leave the model without one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .carried import keep, kept
from .config import KDNAConfig
from .errors import StateError

# The attribute's name from before ModelSpec: models pickled then still carry their spec.
_SPEC_ATTR = "_kdna_builder"
_CONFIG_KEY = "__kdna_config__"
# The ImageNet form's input: what a zoo model without a small stem, and a torchvision classifier, are made for.
IMAGENET_SIZE, IMAGENET_CHANNELS = 224, 3
# The defaults of the options every zoo architecture takes (gate_norm: its KernelDNA models); a `kdna train`
# checkpoint from before ModelSpec stored the options flat, these at their defaults included.
ZOO_DEFAULTS = {"width": 1.0, "small_stem": False, "gate_norm": None}


@dataclass(frozen=True)
class ModelSpec:
    """``create_model(name, **kwargs)``, and the input the model is made for (None: not known)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    in_chans: int | None = None
    image_size: int | None = None
    """The data it was trained or calibrated on (``record_input``): what ``kdna export`` exports at."""

    def build(self) -> nn.Module:
        """A fresh model of this spec, through ``kdna_fx.models.create_model``; it carries this spec's input."""
        from .models import create_model

        model = create_model(self.name, **self.kwargs)
        record_input(model, in_chans=self.in_chans, image_size=self.image_size)
        return model

    def __str__(self) -> str:
        """The call that builds it, as a user would write it: ``create_model('kdna_resnet18', width=0.25)``."""
        options = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"create_model({self.name!r}{options})"

    def to_dict(self) -> dict[str, Any]:
        """JSON data (a KDNAConfig option as its dict); TypeError where JSON cannot hold an option."""
        return {"name": self.name, "kwargs": _encode(self.kwargs),
                "input": {"in_chans": self.in_chans, "image_size": self.image_size}}

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        """The spec ``to_dict`` wrote, or a builder stamp or ``kdna train`` checkpoint spec of an older kdna_fx."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) \
                or not isinstance(data.get("kwargs", {}), dict):
            raise StateError(f"a model spec is {{'name': str, 'kwargs': dict}} (ModelSpec.to_dict), got {data!r}: "
                             f"the file was not written by kdna_fx; pass the model yourself")
        if "kwargs" not in data and len(data) > 1:  # flat: name, width, small_stem, num_classes, in_chans, gate_norm
            kwargs = {k: v for k, v in data.items()
                      if k != "name" and v is not None and (k not in ZOO_DEFAULTS or ZOO_DEFAULTS[k] != v)}
            if "/" in data["name"]:  # a torchvision or timm model took only num_classes
                kwargs = {k: v for k, v in kwargs.items() if k == "num_classes"}
            return cls(data["name"], kwargs, data.get("in_chans"))
        recorded = data.get("input") or {}
        return cls(data["name"], _decode(data.get("kwargs", {})), recorded.get("in_chans"), recorded.get("image_size"))


def _encode(value: Any) -> Any:
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
    try:
        # A small stem is for small images of no one size (Fashion-MNIST's 28, CIFAR's 32): left to record_input.
        record = ModelSpec(name, dict(kwargs), int(kwargs.get("in_chans", IMAGENET_CHANNELS)),
                           None if kwargs.get("small_stem") else IMAGENET_SIZE).to_dict()
    except (TypeError, ValueError):
        return model
    keep(model, _SPEC_ATTR, record)
    return model


def spec_of(model: object) -> ModelSpec | None:
    """How ``model`` was built (``spec_of(model).build()`` rebuilds it); None for a model ``create_model`` did
    not build. Looks inside a ``torch.compile`` wrapper."""
    record = kept(model, _SPEC_ATTR) if isinstance(model, nn.Module) else None
    return None if record is None else ModelSpec.from_dict(record)


def record_input(model: nn.Module, *, image_size: int | None = None, in_chans: int | None = None) -> None:
    """Record on ``model``'s spec the input it is made for (the data it was trained or calibrated on), so that
    a ``kdna_fx.save`` file of it exports at that size (``kdna export``); nothing for a model without a spec."""
    spec = spec_of(model)
    if spec is not None:
        given = {k: int(v) for k, v in {"in_chans": in_chans, "image_size": image_size}.items() if v is not None}
        keep(model, _SPEC_ATTR, dataclasses.replace(spec, **given).to_dict())
