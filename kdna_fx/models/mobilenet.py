"""MobileNetV2 whose middle blocks reuse the pointwise (1x1) kernels of their stage's last block."""
from __future__ import annotations

import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from ..config import KDNAConfig
from ..functional import GateNorm
from ._common import Parents, SharedStage, check_options, child_conv, kaiming_conv, replace_mode, run_conv, scaled
from ._registry import register

# (expansion t, base channels c, blocks n, first stride s), as in the MobileNetV2 paper.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
# Stages (by base channels) whose middle blocks become children of the last block's expand/project convs.
SHARED_STAGES = (32, 64, 96, 160)
# Gate reductions: r = 4 on the narrow input of the expand conv, r = 24 on the 6x wider input of the
# project conv, so both gates have C/4 hidden units.
EXPAND_REDUCTION, PROJECT_REDUCTION = 4, 24


def _pointwise(inp: int, out: int, parent: str | None, reduction: int, gate_norm: GateNorm) -> nn.Module:
    if parent is None:
        return nn.Conv2d(inp, out, 1, bias=False)
    return child_conv(parent, inp, out, 1, reduction=reduction, gate_norm=gate_norm)


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> project 1x1; ``expand`` and ``project`` may be children."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, shared: dict[str, str],
                 gate_norm: GateNorm):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_residual = stride == 1 and inp == oup
        self.expand: nn.Module | None = None
        if expand_ratio != 1:
            self.expand = _pointwise(inp, hidden, shared.get("expand"), EXPAND_REDUCTION, gate_norm)
            self.expand_bn = nn.BatchNorm2d(hidden)
        # Depthwise convs are never shared (as in the reference): they hold few parameters.
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.project = _pointwise(hidden, oup, shared.get("project"), PROJECT_REDUCTION, gate_norm)
        self.project_bn = nn.BatchNorm2d(oup)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: Tensor, parents: Parents) -> Tensor:
        out = x
        if self.expand is not None:
            out = self.act(self.expand_bn(run_conv(self.expand, out, parents)))
        out = self.act(self.dw_bn(self.dw(out)))
        out = self.project_bn(run_conv(self.project, out, parents))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision-equivalent counts) with KernelDNA pointwise sharing in SHARED_STAGES."""

    def __init__(self, *, num_classes: int = 1000, in_chans: int = 3, width: float = 1.0, small_stem: bool = False,
                 share: bool = True, gate_norm: GateNorm = "batch", dropout: float = 0.2):
        super().__init__()
        inp = scaled(32, width, 8)
        last = scaled(1280, max(1.0, width), 8)
        stages: list[nn.Module] = [Conv2dNormActivation(in_chans, inp, 3, stride=1 if small_stem else 2,
                                                        norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)]
        for t, c, n, s in SETTINGS:
            name, oup = f"features.{len(stages)}", scaled(c, width, 8)
            parent = f"{n - 1}"
            blocks = []
            for i in range(n):
                middle = share and c in SHARED_STAGES and 0 < i < n - 1
                shared = {"expand": f"{name}.{parent}.expand", "project": f"{name}.{parent}.project"} if middle else {}
                blocks.append(InvertedResidual(inp, oup, s if i == 0 else 1, t, shared, gate_norm))
                inp = oup
            stages.append(SharedStage(name, *blocks))
        stages.append(Conv2dNormActivation(inp, last, 1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():  # torchvision's initialisation; F stays zero
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier[1].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))


# ---- registered models ------------------------------------------------------------------------------
def _baseline(name: str, num_classes: int, in_chans: int, small_stem: bool, width: float) -> nn.Module:
    check_options(name, num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width)
    if small_stem or in_chans != 3:
        stem = model.features[0][0]
        model.features[0][0] = kaiming_conv(in_chans, stem.out_channels, 3, 1 if small_stem else 2, 1)
    return model


def _kdna(name: str, num_classes: int, in_chans: int, small_stem: bool, width: float,
          gate_norm: GateNorm) -> MobileNetV2:
    check_options(name, num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem)
    if gate_norm not in ("batch", "layer", "none"):
        raise ValueError(f"{name}: gate_norm must be 'batch', 'layer' or 'none', got {gate_norm!r}")
    return MobileNetV2(num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem,
                       gate_norm=gate_norm)


@register
def mobilenet_v2(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False,
                 width: float = 1.0) -> nn.Module:
    """Plain torchvision MobileNetV2 (weights=None); ``width`` is torchvision's width_mult."""
    return _baseline("mobilenet_v2", num_classes, in_chans, small_stem, width)


@register
def replace_mobilenet_v2(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0,
                         config: KDNAConfig | None = None) -> nn.Module:
    """kdna_fx.transform(mobilenet_v2(...)), by default sharing same-shaped 1x1 convs (kernel_sizes=(1,))."""
    config = config if config is not None else KDNAConfig(kernel_sizes=(1,))
    return replace_mode(mobilenet_v2(num_classes, in_chans, small_stem, width), config)


@register
def kdna_mobilenet_v2(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0,
                      gate_norm: GateNorm = "batch") -> MobileNetV2:
    """KernelDNA MobileNetV2 1.0x (reference topology): 3,136,840 parameters at 1000 classes."""
    return _kdna("kdna_mobilenet_v2", num_classes, in_chans, small_stem, width, gate_norm)


@register
def kdna_mobilenet_v2_050(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False,
                          gate_norm: GateNorm = "batch") -> MobileNetV2:
    """KernelDNA MobileNetV2 0.5x (reference topology): 1,878,232 parameters at 1000 classes."""
    return _kdna("kdna_mobilenet_v2_050", num_classes, in_chans, small_stem, 0.5, gate_norm)
