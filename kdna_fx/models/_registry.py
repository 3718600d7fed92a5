"""Name -> builder registry behind create_model / list_models."""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from typing import Any, Callable

from torch import nn

from ..config import KDNAConfig
from ..errors import ConfigError, KDNATypeError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_SHARING: dict[str, Callable[[], KDNAConfig]] = {}


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name."""
    if fn.__name__ in _MODELS:
        raise ConfigError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the models ``create_model`` builds, filtered by a shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def model_options(name: str) -> list[str]:
    """The options ``create_model(name, ...)`` takes."""
    return list(inspect.signature(_builder(name)).parameters)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), list(_MODELS), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} Available models: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` (see ``list_models()``), freshly initialised, no weights.

    Every model takes ``num_classes``, ``in_chans`` and ``small_stem``; see docs/models.md for the rest.
    """
    accepted = model_options(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise KDNATypeError(f"{name} does not take option(s) {unknown}; it takes {accepted}")
    return _MODELS[name](**kwargs)


def register_sharing(arch: str, make: Callable[[], KDNAConfig]) -> None:
    """Declare which convs of the plain architecture ``arch`` share by default (see ``sharing_config``)."""
    _SHARING[arch] = make


def sharing_config(name: str) -> KDNAConfig:
    """The KDNAConfig that ``replace_<arch>`` and ``kdna convert`` use when given none.

    ``name`` may be the plain, ``replace_`` or ``kdna_`` name of a zoo architecture; MobileNetV2 shares its
    1x1 convs and ConvNeXt its depthwise 7x7 convs, since neither has plain 3x3 convs to share. Any other
    name (a torchvision model, say) gets ``KDNAConfig()``: same-shaped 3x3 convs of each stage.
    """
    arch = re.sub(r"^(replace_|kdna_)", "", name)
    arch = re.sub(r"_0\d\d$", "", arch)  # kdna_mobilenet_v2_050 -> mobilenet_v2
    make = _SHARING.get(arch)
    return make() if make is not None else KDNAConfig()
