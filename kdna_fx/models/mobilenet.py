"""MobileNetV2, and the KernelDNA reference topology: the middle blocks of a stage reuse the pointwise (1x1)
kernels of the stage's last block, with their own depthwise convs, BatchNorms and gates."""
from __future__ import annotations

import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from ..config import KDNAConfig
from ..functional import GateNorm
from ._common import TimmAPI, check_options, kaiming_conv, reference_config, scaled
from ._registry import Arch, Reference, register_arch

# (expansion t, base channels c, blocks n, first stride s), as in the MobileNetV2 paper.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
# Stages (by base channels) whose middle blocks become children of the last block's expand/project convs.
SHARED_STAGES = (32, 64, 96, 160)
# Gate reductions: r = 4 on the narrow input of the expand conv, r = 24 on the 6x wider input of the
# project conv, so both gates have C/4 hidden units.
EXPAND_REDUCTION, PROJECT_REDUCTION = 4, 24


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> project 1x1 (torchvision's block, with short names)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_residual = stride == 1 and inp == oup
        self.expand: nn.Module | None = None
        if expand_ratio != 1:
            self.expand = nn.Conv2d(inp, hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, oup, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(oup)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.expand is not None:
            out = self.act(self.expand_bn(self.expand(out)))
        out = self.act(self.dw_bn(self.dw(out)))
        out = self.project_bn(self.project(out))
        return x + out if self.use_residual else out


class TorchvisionMobileNetV2(TimmAPI, torchvision.models.MobileNetV2):
    """torchvision's MobileNetV2 (the plain network) with timm's model API."""

    _stages, _classifier = ("features.*",), "classifier.1"


class MobileNetV2(TimmAPI, nn.Module):
    """MobileNetV2 with torchvision's parameters, MACs and initialisation (module names of our own)."""

    _stages, _classifier = ("features.*",), "classifier.1"

    def __init__(self, *, num_classes: int = 1000, in_chans: int = 3, width: float = 1.0, small_stem: bool = False,
                 dropout: float = 0.2):
        super().__init__()
        inp = scaled(32, width, 8)
        last = scaled(1280, max(1.0, width), 8)
        stages: list[nn.Module] = [Conv2dNormActivation(in_chans, inp, 3, stride=1 if small_stem else 2,
                                                        norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)]
        for t, c, n, s in SETTINGS:
            oup, blocks = scaled(c, width, 8), []
            for i in range(n):
                blocks.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
                inp = oup
            stages.append(nn.Sequential(*blocks))
        stages.append(Conv2dNormActivation(inp, last, 1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier[1].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[1].bias)


# ---- registered architectures -----------------------------------------------------------------------
def reference_families() -> list[dict]:
    """In each stage of SHARED_STAGES, the middle blocks' expand and project convs are children of the
    stage's last block's (the first block, which changes the width or stride, keeps its own)."""
    families, index = [], 1  # features.0 is the stem
    for _, c, n, _ in SETTINGS:
        if c in SHARED_STAGES and n > 2:
            for conv in ("expand", "project"):
                families.append({"parent": f"features.{index}.{n - 1}.{conv}",
                                 "children": [f"features.{index}.{i}.{conv}" for i in range(1, n - 1)]})
        index += 1
    return families


def plain(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0) -> nn.Module:
    """Plain torchvision MobileNetV2 (weights=None); ``width`` is torchvision's width_mult."""
    check_options("mobilenet_v2", num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem)
    model = TorchvisionMobileNetV2(num_classes=num_classes, width_mult=width)  # = mobilenet_v2(weights=None)
    if small_stem or in_chans != 3:
        stem = model.features[0][0]
        model.features[0][0] = kaiming_conv(in_chans, stem.out_channels, 3, 1 if small_stem else 2, 1)
    return model


def reference(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0,
              gate_norm: GateNorm = "batch") -> Reference:
    """KernelDNA MobileNetV2 (reference topology): 3,136,840 parameters at 1000 classes (0.5x: 1,878,232)."""
    check_options("mobilenet_v2.kdna", num_classes=num_classes, in_chans=in_chans, width=width,
                  small_stem=small_stem)
    config = reference_config(gate_norm, kernel_sizes=(1,), stage_depth=2,
                              reductions={r"\.expand$": EXPAND_REDUCTION, r"\.project$": PROJECT_REDUCTION})
    net = MobileNetV2(num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem)
    return Reference(net, reference_families(), config)


def plain_050(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False) -> nn.Module:
    """Plain torchvision MobileNetV2 0.5x (width_mult 0.5): 1,968,680 parameters at 1000 classes."""
    return plain(num_classes, in_chans, small_stem, 0.5)


def reference_050(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False,
                  gate_norm: GateNorm = "batch") -> Reference:
    """KernelDNA MobileNetV2 0.5x (reference topology): 1,878,232 parameters at 1000 classes."""
    return reference(num_classes, in_chans, small_stem, 0.5, gate_norm)


def default_sharing() -> KDNAConfig:
    """Its 3x3 convs are depthwise: the same-shaped 1x1 expand/project convs share instead."""
    return KDNAConfig(kernel_sizes=(1,))


# Feature stages (reductions 2, 4, 8, 16, 32): torchvision's flat block list, and the stages of our class.
PLAIN_FEATURES = ("features.1", "features.3", "features.6", "features.13", "features.18")
REFERENCE_FEATURES = ("features.1", "features.2", "features.3", "features.5", "features.8")
for _name, _plain, _reference in (("mobilenet_v2", plain, reference), ("mobilenet_v2_050", plain_050, reference_050)):
    register_arch(Arch(_name, _plain, _reference, default_sharing, PLAIN_FEATURES, REFERENCE_FEATURES,
                       first_conv="features.0.0", classifier="classifier.1"))
