"""Building the model of a run spec (the plain dict ``kdna train`` stores in checkpoints) through
kdna_fx.models.create_model, the one resolver of model names."""
from __future__ import annotations

from typing import Any

from torch import nn

from kdna_fx.errors import ConfigError

_DEFAULTS = {"num_classes": None, "in_chans": 3, "small_stem": False, "width": 1.0, "gate_norm": None}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """``spec``: name and any of num_classes, in_chans, small_stem, width, gate_norm. An option the model does
    not take must be at its default (``gate_norm`` applies to ``kdna`` and ``replace`` models only)."""
    from kdna_fx import models

    name = spec["name"]
    options = models.model_options(name)  # an unknown name is a ConfigError listing the close matches
    kwargs = {k: spec[k] for k in _DEFAULTS if spec.get(k) is not None and k in options}
    ignored = [k for k in _DEFAULTS if k not in options and spec.get(k, _DEFAULTS[k]) != _DEFAULTS[k]]
    if ignored:
        raise ConfigError(f"model {name!r} does not take {', '.join(ignored)} (it takes {options}); "
                          f"--gate-norm applies to KernelDNA models (kdna_*, replace_*)")
    return models.create_model(name, **kwargs)
