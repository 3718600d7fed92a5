"""Building models by name through kdna_fx.models (the zoo), from a plain-dict spec stored in checkpoints."""
from __future__ import annotations

from typing import Any

from torch import nn

from kdna_fx.errors import ConfigError


def build_model(spec: dict[str, Any]) -> nn.Module:
    """``spec``: name, num_classes, in_chans, small_stem, width and optionally gate_norm.

    ``gate_norm`` goes to kdna_* models directly and to replace_* models through their KDNAConfig.
    """
    from kdna_fx import models

    name = spec["name"]
    options = models.model_options(name)  # an unknown name is a ConfigError listing the close matches
    kwargs: dict[str, Any] = {k: spec[k] for k in ("num_classes", "in_chans", "small_stem", "width") if k in spec}
    gate_norm = spec.get("gate_norm")
    if gate_norm is not None:
        if "gate_norm" in options:
            kwargs["gate_norm"] = gate_norm
        elif "config" in options:
            import dataclasses

            # the architecture's own sharing (MobileNetV2's 1x1 convs, ...) with the gate norm asked for
            kwargs["config"] = models.sharing_config(name).map_adapters(
                lambda a: dataclasses.replace(a, gate_norm=gate_norm))
        else:
            raise ConfigError(f"--gate-norm applies to KernelDNA models (kdna_*, replace_*), not {name!r}")
    return models.create_model(name, **kwargs)
