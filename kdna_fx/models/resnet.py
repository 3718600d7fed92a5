"""ResNet-18/50: torchvision-shaped ResNets whose stages can hold KernelDNA children.

Module and parameter names follow torchvision (conv1, bn1, layer3.1.conv2, downsample.0, fc), so a plain
layout at width 1 is the torchvision ResNet, and a child sits where torchvision has a conv.
"""
from __future__ import annotations

from typing import Sequence

import torchvision
from torch import Tensor, nn

from ..config import KDNAConfig
from ..functional import GateNorm
from ._common import Parents, SharedStage, check_options, child_conv, kaiming_conv, replace_mode, run_conv, scaled
from ._registry import register

# A stage layout lists, per block, which conv slots are children and of which parent (block index and
# slot inside the same stage). An empty dict is an ordinary block.
Layout = Sequence[dict[str, str]]


def _conv3x3(inplanes: int, planes: int, stride: int, parent: str | None, gate_norm: GateNorm) -> nn.Module:
    if parent is None:
        return nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    return child_conv(parent, inplanes, planes, 3, stride=stride, padding=1, gate_norm=gate_norm)


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


class BasicBlock(nn.Module):
    """Two 3x3 convs (conv1, conv2), either of which may be a child."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, shared: dict[str, str], gate_norm: GateNorm):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, shared.get("conv1"), gate_norm)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, shared.get("conv2"), gate_norm)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes, stride)

    def forward(self, x: Tensor, parents: Parents) -> Tensor:
        out = self.relu(self.bn1(run_conv(self.conv1, x, parents)))
        out = self.bn2(run_conv(self.conv2, out, parents))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (stride on the 3x3, as torchvision); only the 3x3 conv2 may be a child."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, shared: dict[str, str], gate_norm: GateNorm):
        super().__init__()
        if set(shared) - {"conv2"}:
            raise ValueError(f"a bottleneck shares only its 3x3 conv2, got slots {sorted(shared)}")
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, shared.get("conv2"), gate_norm)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, outplanes, stride)

    def forward(self, x: Tensor, parents: Parents) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        # The gate (inside the child) sees the 3x3 conv's input only, never the residual input x.
        out = self.relu(self.bn2(run_conv(self.conv2, out, parents)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet built from per-stage layouts (four stages of 64, 128, 256, 512 base channels x width)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layouts: Sequence[Layout], *,
                 num_classes: int = 1000, in_chans: int = 3, width: float = 1.0, small_stem: bool = False,
                 gate_norm: GateNorm = "batch"):
        super().__init__()
        stem = scaled(64, width)
        if small_stem:  # 28-32 px inputs: keep the resolution, no max-pool
            self.conv1 = nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.Identity() if small_stem else nn.MaxPool2d(3, 2, 1)
        inplanes = stem
        for i, (base, layout) in enumerate(zip((64, 128, 256, 512), layouts)):
            name, planes = f"layer{i + 1}", scaled(base, width)
            blocks = []
            for j, shared in enumerate(layout):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(inplanes, planes, stride, {k: f"{name}.{v}" for k, v in shared.items()},
                                    gate_norm))
                inplanes = planes * block.expansion
            setattr(self, name, SharedStage(name, *blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():  # torchvision's initialisation; F and S stay zero
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def plain_layouts(depths: Sequence[int]) -> list[Layout]:
    """Ordinary stages: no children."""
    return [[{} for _ in range(d)] for d in depths]


# ResNet-18, stages 3 and 4 rebuilt from 2 to 3 blocks with 3 unique 3x3 kernels (A.conv1, P1, P2):
# A = conv1 (stride) -> child of P1; B = child of P1 -> P1; C = child of P2 -> P2.
_R18_SHARED: Layout = [{"conv2": "1.conv2"}, {"conv1": "1.conv2"}, {"conv1": "2.conv2"}]
KDNA_RESNET18: list[Layout] = [*plain_layouts((2, 2)), _R18_SHARED, _R18_SHARED]

# ResNet-50: stage 3 = stride-2 block, then 3 x (child, parent) (7 blocks instead of 6); stage 4 =
# stride-2 block, child, parent. Each child bottleneck reuses the 3x3 kernel of the block after it.
KDNA_RESNET50: list[Layout] = [
    *plain_layouts((3, 4)),
    [{}, {"conv2": "2.conv2"}, {}, {"conv2": "4.conv2"}, {}, {"conv2": "6.conv2"}, {}],
    [{}, {"conv2": "2.conv2"}, {}],
]


# ---- registered models ------------------------------------------------------------------------------
_ARCH = {"resnet18": (BasicBlock, (2, 2, 2, 2), KDNA_RESNET18),
         "resnet50": (Bottleneck, (3, 4, 6, 3), KDNA_RESNET50)}


def _baseline(arch: str, num_classes: int, in_chans: int, small_stem: bool, width: float) -> nn.Module:
    check_options(arch, num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem)
    block, depths, _ = _ARCH[arch]
    if width != 1:  # torchvision has no width multiplier; this class reproduces it (tested at width 1)
        return ResNet(block, plain_layouts(depths), num_classes=num_classes, in_chans=in_chans, width=width,
                      small_stem=small_stem)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if small_stem:
        model.conv1 = kaiming_conv(in_chans, 64, 3, 1, 1)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = kaiming_conv(in_chans, 64, 7, 2, 3)
    return model


def _kdna(arch: str, num_classes: int, in_chans: int, small_stem: bool, width: float,
          gate_norm: GateNorm) -> ResNet:
    check_options(f"kdna_{arch}", num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem)
    if gate_norm not in ("batch", "layer", "none"):
        raise ValueError(f"kdna_{arch}: gate_norm must be 'batch', 'layer' or 'none', got {gate_norm!r}")
    block, _, layouts = _ARCH[arch]
    return ResNet(block, layouts, num_classes=num_classes, in_chans=in_chans, width=width,
                  small_stem=small_stem, gate_norm=gate_norm)


@register
def resnet18(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0) -> nn.Module:
    """Plain torchvision ResNet-18 (weights=None); width != 1 scales every stage's channels."""
    return _baseline("resnet18", num_classes, in_chans, small_stem, width)


@register
def resnet50(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0) -> nn.Module:
    """Plain torchvision ResNet-50 (weights=None); width != 1 scales every stage's channels."""
    return _baseline("resnet50", num_classes, in_chans, small_stem, width)


@register
def replace_resnet18(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0,
                     config: KDNAConfig | None = None) -> nn.Module:
    """kdna_fx.transform(resnet18(...), config): same-shaped 3x3 convs of each stage share one kernel."""
    return replace_mode(resnet18(num_classes, in_chans, small_stem, width), config)


@register
def replace_resnet50(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0,
                     config: KDNAConfig | None = None) -> nn.Module:
    """kdna_fx.transform(resnet50(...), config): same-shaped 3x3 convs of each stage share one kernel."""
    return replace_mode(resnet50(num_classes, in_chans, small_stem, width), config)


@register
def kdna_resnet18(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0,
                  gate_norm: GateNorm = "batch") -> ResNet:
    """KernelDNA ResNet-18 (reference topology): 9,240,798 parameters at 1000 classes."""
    return _kdna("resnet18", num_classes, in_chans, small_stem, width, gate_norm)


@register
def kdna_resnet50(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0,
                  gate_norm: GateNorm = "batch") -> ResNet:
    """KernelDNA ResNet-50 (reference topology): 22,778,060 parameters at 1000 classes."""
    return _kdna("resnet50", num_classes, in_chans, small_stem, width, gate_norm)
