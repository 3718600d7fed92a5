"""ResNet-18/50: torchvision-shaped ResNets, and the KernelDNA reference topologies as a deeper plain ResNet
plus a plan.

Module and parameter names follow torchvision (conv1, bn1, layer3.1.conv2, downsample.0, fc), so the plain
network at width 1 is the torchvision ResNet, and a child sits where torchvision has a conv.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torchvision
from torch import Tensor, nn

from ..functional import GateNorm
from ._common import TimmAPI, check_options, kaiming_conv, reference_config, scaled
from ._registry import Arch, Reference, register_arch


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


class BasicBlock(nn.Module):
    """Two 3x3 convs, conv1 (with the stride) and conv2, and a residual."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1, the stride on the 3x3 conv2 (as torchvision)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, outplanes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
"""The feature modules of a ResNet, in order (timm's forward_features, TimmAPI)."""


class TorchvisionResNet(TimmAPI, torchvision.models.ResNet):
    """torchvision's ResNet (the plain network at width 1) with timm's model API."""

    _stages = STAGES


class ResNet(TimmAPI, nn.Module):
    """A ResNet with four stages of 64, 128, 256, 512 base channels x width and ``depths`` blocks each."""

    _stages = STAGES

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: Sequence[int], *,
                 num_classes: int = 1000, in_chans: int = 3, width: float = 1.0, small_stem: bool = False):
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
        for i, (base, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            planes, blocks = scaled(base, width), []
            for j in range(depth):
                blocks.append(block(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _r18_stage(s: str) -> list[dict]:
    # Three blocks, three unique 3x3 kernels (A.conv1, P1 = B.conv2, P2 = C.conv2):
    # A = conv1 (stride) -> child of P1; B = child of P1 -> P1; C = child of P2 -> P2.
    return [{"parent": f"{s}.1.conv2", "children": [f"{s}.0.conv2", f"{s}.1.conv1"]},
            {"parent": f"{s}.2.conv2", "children": [f"{s}.2.conv1"]}]


# The reference topologies: (block, depths of the plain network, families). Stages 3 and 4 of ResNet-18 go
# from 2 to 3 blocks; ResNet-50's stage 3 from 6 to 7 blocks, each child bottleneck reusing the 3x3 kernel
# of the block after it (stage 3: 3 x (child, parent); stage 4: child, parent).
REFERENCE = {
    "resnet18": (BasicBlock, (2, 2, 3, 3), _r18_stage("layer3") + _r18_stage("layer4")),
    "resnet50": (Bottleneck, (3, 4, 7, 3),
                 [{"parent": f"layer3.{p}.conv2", "children": [f"layer3.{p - 1}.conv2"]} for p in (2, 4, 6)]
                 + [{"parent": "layer4.2.conv2", "children": ["layer4.1.conv2"]}]),
}
_BASELINE = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}
_TORCHVISION = {"resnet18": torchvision.models.resnet.BasicBlock, "resnet50": torchvision.models.resnet.Bottleneck}


# ---- registered architectures -----------------------------------------------------------------------
def plain(arch: str, num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False,
          width: float = 1.0) -> nn.Module:
    """Plain torchvision ResNet (weights=None); width != 1 scales every stage's channels."""
    check_options(arch, num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem)
    block, depths = _BASELINE[arch]
    if width != 1:  # torchvision has no width multiplier; this class reproduces it (tested at width 1)
        return ResNet(block, depths, num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem)
    model = TorchvisionResNet(_TORCHVISION[arch], list(depths), num_classes=num_classes)  # = resnetXX(weights=None)
    if small_stem:
        model.conv1 = kaiming_conv(in_chans, 64, 3, 1, 1)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = kaiming_conv(in_chans, 64, 7, 2, 3)
    return model


def reference(arch: str, num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0,
              gate_norm: GateNorm = "batch") -> Reference:
    """KernelDNA reference topology: ResNet-18 as a 2-2-3-3 ResNet with 6 children (9,240,798 parameters at
    1000 classes), ResNet-50 as a 3-4-7-3 ResNet with 4 children (22,778,060)."""
    check_options(f"{arch}.kdna", num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem)
    block, depths, families = REFERENCE[arch]
    net = ResNet(block, depths, num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem)
    return Reference(net, families, reference_config(gate_norm))


FEATURES = ("relu", "layer1", "layer2", "layer3", "layer4")  # the stem's activation, then each stage
for _arch in ("resnet18", "resnet50"):
    register_arch(Arch(_arch, partial(plain, _arch), partial(reference, _arch), plain_features=FEATURES,
                       reference_features=FEATURES))
