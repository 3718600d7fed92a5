"""Building blocks shared by the zoo: child convs, the stage that owns parent kernels, option checks."""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from ..adapters import ChildAdapter, Gate
from ..functional import GateNorm

Parents = dict[str, Tensor]


def child_conv(parent: str, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
               padding: int = 0, groups: int = 1, reduction: int = 4, gate_norm: GateNorm = "batch") -> ChildAdapter:
    """A KernelDNA child conv: SE gate on its input, F [C_out], S [k, k] (none for 1x1), no kernel of its own.

    ``parent`` is the qualified name (from the zoo model's root) of the module whose ``weight`` it reuses.
    """
    return ChildAdapter(parent=parent, out_channels=out_channels, in_channels=in_channels,
                        kernel_size=(kernel_size, kernel_size), stride=stride, padding=padding, groups=groups,
                        gate=Gate(in_channels, reduction, norm=gate_norm))


def run_conv(conv: nn.Module, x: Tensor, parents: Parents) -> Tensor:
    """Apply a conv slot: an ordinary conv, or a child fed with its parent's kernel."""
    # isinstance on a module is resolved once at trace/compile time, not per input.
    if isinstance(conv, ChildAdapter):
        return conv(x, parents[conv.parent])
    return conv(x)


class SharedStage(nn.Sequential):
    """A run of blocks whose child convs reuse kernels owned by other blocks of the same stage.

    Each kernel stays a parameter of exactly one conv (its owner); the stage looks the parents up at
    forward time and hands them to every block, so nothing is registered twice. Blocks take
    ``(x, parents)``. ``name`` is the stage's qualified name in the model, the prefix of every parent name.
    """

    def __init__(self, name: str, *blocks: nn.Module):
        super().__init__(*blocks)
        self._parent_paths: dict[str, str] = {}
        for module in self.modules():
            if not isinstance(module, ChildAdapter):
                continue
            if not module.parent.startswith(name + "."):
                raise ValueError(f"child of {module.parent!r} sits in stage {name!r}: a parent must be owned "
                                 f"by a block of the same stage")
            path = module.parent[len(name) + 1:]
            owner = self.get_submodule(path)
            shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
            if not isinstance(owner, nn.Conv2d) or tuple(owner.weight.shape) != shape:
                raise ValueError(f"parent {module.parent!r} must be an nn.Conv2d with a {shape} kernel, "
                                 f"got {owner!r}")
            self._parent_paths[module.parent] = path

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        parents = {name: self.get_submodule(path).weight for name, path in self._parent_paths.items()}
        for block in self:
            x = block(x, parents)
        return x


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
            raise ValueError(f"{name}: {key} must be a positive integer, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"{name}: width must be a positive number (channel multiplier, 1.0 = reference), "
                         f"got {width!r}")
    if not isinstance(small_stem, bool):
        raise ValueError(f"{name}: small_stem must be True or False, got {small_stem!r}")


def replace_mode(model: nn.Module, config: Any) -> nn.Module:
    """``kdna_fx.transform(model, config)``: the automatic FX rewrite of an ordinary model."""
    from ..api import transform  # late: kdna_fx may import this package while it is being set up
    from ..config import KDNAConfig

    if config is not None and not isinstance(config, KDNAConfig):
        raise TypeError(f"config must be a kdna_fx.KDNAConfig or None, got {type(config).__name__}")
    return transform(model, config)


def kaiming_conv(in_chans: int, out_chans: int, kernel_size: int, stride: int, padding: int,
                 bias: bool = False) -> nn.Conv2d:
    """A stem conv initialised as torchvision initialises ResNet and MobileNetV2 convs."""
    conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv
