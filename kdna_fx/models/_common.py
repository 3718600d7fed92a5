"""Building blocks shared by the zoo: the reference topologies as a plain network plus a plan, option checks."""
from __future__ import annotations

import math
from typing import Any, Sequence

from torch import nn

from ..config import AdapterConfig, KDNAConfig
from ..errors import ConfigError
from ..functional import GateNorm


def with_plan(model: nn.Module, families: Sequence[dict[str, Any]], config: KDNAConfig) -> nn.Module:
    """A reference topology: the plain ``model`` transformed by kdna_fx.transform with the given families.

    Each family is ``{"parent": conv name, "children": [conv names]}``; the transform is the one every user
    model goes through, so report, fold, save/load, as_function and export work on zoo models too.
    """
    from ..api import transform  # late: kdna_fx imports this package while it is being set up
    from ..datamodel import Plan

    return transform(model, config, plan=Plan.from_dict({"families": list(families)}), inplace=True)


def reference_config(gate_norm: GateNorm, *, kernel_sizes: tuple[int, ...] = (3,), stage_depth: int = 1,
                     reductions: dict[str, int] | None = None) -> KDNAConfig:
    """The config of a reference topology: SE gate (r = 4 unless ``reductions`` maps a conv-name regex to
    another r), F and S, every conv the plan names shared whatever its size (the reference counts)."""
    regex = [(pattern, AdapterConfig(reduction=r, gate_norm=gate_norm)) for pattern, r in (reductions or {}).items()]
    return KDNAConfig(adapter=AdapterConfig(gate_norm=gate_norm), by_name_regex=regex, kernel_sizes=kernel_sizes,
                      stage_depth=stage_depth, only_if_smaller=False)


def scaled(channels: int, width: float, divisor: int = 1) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (never below it, never 10% below the target)."""
    if divisor == 1:
        return max(1, int(round(channels * width)))
    target = channels * width
    value = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return value + divisor if value < 0.9 * target else value


def check_options(name: str, *, num_classes: Any, in_chans: Any, width: Any, small_stem: Any) -> None:
    """Raise a clear error for an option value the zoo cannot build."""
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}: {key} must be a positive integer, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ConfigError(f"{name}: width must be a positive number (channel multiplier, 1.0 = reference), "
                          f"got {width!r}")
    if not isinstance(small_stem, bool):
        raise ConfigError(f"{name}: small_stem must be True or False, got {small_stem!r}")


def kaiming_conv(in_chans: int, out_chans: int, kernel_size: int, stride: int, padding: int,
                 bias: bool = False) -> nn.Conv2d:
    """A stem conv initialised as torchvision initialises ResNet and MobileNetV2 convs."""
    conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv
