"""ConvNeXt-Tiny with KernelDNA sharing of the pointwise MLP kernels inside each stage.

The reference code has no ConvNeXt. Our rule carries the reference MobileNetV2 rule over (ConvNeXt's
parameters, like MobileNetV2's, sit almost all in the pointwise layers):

* the two pointwise layers of a block (expand C -> 4C and project 4C -> C, torchvision's Linear layers,
  here 1x1 convs: the same parameters and MACs) are the shared kernels;
* in every stage the first block keeps its own kernels; the remaining blocks form runs of at most three,
  the last block of a run being the parent of the (at most two, the most the reference MobileNetV2
  gives one parent) blocks before it. Depths 3, 3, 9, 3 give 1, 1, 5, 1 child blocks;
* a child has F only (1x1 kernels have no spatial scale) and an SE gate on the input of each pointwise
  conv, with C/4 hidden units on both (r = 4 on C, r = 16 on 4C);
* depthwise 7x7 convs, LayerNorms and layer scales are never shared. No norm follows the pointwise
  convs, so F is not cancelled here (unlike the BatchNorm-followed children of the ResNets).
"""
from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.convnext import CNBlockConfig, LayerNorm2d
from torchvision.ops import StochasticDepth

from ..config import KDNAConfig
from ..functional import GateNorm
from ._common import TimmAPI, check_options, reference_config, scaled
from ._registry import Arch, Reference, register_arch

DIMS, DEPTHS = (96, 192, 384, 768), (3, 3, 9, 3)
EXPAND_REDUCTION, PROJECT_REDUCTION = 4, 16
RUN = 3  # a parent and at most RUN - 1 children


def sharing(depth: int) -> list[int | None]:
    """For each block of a stage, the index of the block whose pointwise kernels it reuses (None: its own)."""
    parent_of: list[int | None] = [None] * depth
    rest = list(range(1, depth))
    for start in range(0, len(rest), RUN):
        run = rest[start:start + RUN]
        for block in run[:-1]:
            parent_of[block] = run[-1]
    return parent_of


class ConvNeXtBlock(nn.Module):
    """dw 7x7 -> LayerNorm -> pw expand -> GELU -> pw project -> layer scale -> drop path (+ input)."""

    def __init__(self, dim: int, drop_path: float, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(4 * dim, dim, 1)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: Tensor) -> Tensor:
        out = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.drop_path(self.layer_scale * out)


class TorchvisionConvNeXt(TimmAPI, torchvision.models.ConvNeXt):
    """torchvision's ConvNeXt (the plain network) with timm's model API."""

    _stages, _classifier = ("features.*",), "classifier.2"


class ConvNeXt(TimmAPI, nn.Module):
    """ConvNeXt with torchvision's layout, parameters and initialisation; pointwise layers as 1x1 convs."""

    _stages, _classifier = ("features.*",), "classifier.2"

    def __init__(self, *, num_classes: int = 1000, in_chans: int = 3, width: float = 1.0, small_stem: bool = False,
                 drop_path: float = 0.1):
        super().__init__()
        dims = [scaled(d, width) for d in DIMS]
        stem = (nn.Conv2d(in_chans, dims[0], 3, 1, 1) if small_stem else nn.Conv2d(in_chans, dims[0], 4, 4))
        layers: list[nn.Module] = [nn.Sequential(stem, LayerNorm2d(dims[0], eps=1e-6))]
        total, seen = sum(DEPTHS), 0
        for i, (dim, depth) in enumerate(zip(dims, DEPTHS)):
            blocks = []
            for _ in range(depth):
                blocks.append(ConvNeXtBlock(dim, drop_path * seen / (total - 1)))
                seen += 1
            layers.append(nn.Sequential(*blocks))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1),
                                        nn.Linear(dims[-1], num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def reference_families() -> list[dict]:
    """Per stage (features.1, .3, .5, .7), the runs of ``sharing``: each child block's pwconv1 and pwconv2
    reuse those of the last block of its run."""
    families = []
    for stage, depth in zip((1, 3, 5, 7), DEPTHS):
        runs: dict[int, list[int]] = {}
        for block, parent in enumerate(sharing(depth)):
            if parent is not None:
                runs.setdefault(parent, []).append(block)
        for parent, children in runs.items():
            for conv in ("pwconv1", "pwconv2"):
                families.append({"parent": f"features.{stage}.{parent}.{conv}",
                                 "children": [f"features.{stage}.{c}.{conv}" for c in children]})
    return families


# ---- registered architecture ------------------------------------------------------------------------
def plain(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0) -> nn.Module:
    """Plain torchvision ConvNeXt-Tiny (weights=None); ``width`` scales the stage widths 96-192-384-768."""
    check_options("convnext_tiny", num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem)
    dims = [scaled(d, width) for d in DIMS]  # width 1: convnext_tiny(weights=None)
    setting = [CNBlockConfig(d, dims[i + 1] if i + 1 < len(dims) else None, n)
               for i, (d, n) in enumerate(zip(dims, DEPTHS))]
    model = TorchvisionConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=num_classes)
    if small_stem or in_chans != 3:
        old = model.features[0][0]
        stem = (nn.Conv2d(in_chans, old.out_channels, 3, 1, 1) if small_stem
                else nn.Conv2d(in_chans, old.out_channels, 4, 4))
        nn.init.trunc_normal_(stem.weight, std=0.02)
        nn.init.zeros_(stem.bias)
        model.features[0][0] = stem
    return model


def reference(num_classes: int = 1000, in_chans: int = 3, small_stem: bool = False, width: float = 1.0,
              gate_norm: GateNorm = "batch", drop_path: float = 0.1) -> Reference:
    """KernelDNA ConvNeXt-Tiny (our design, see the module docstring and docs/models.md)."""
    check_options("convnext_tiny.kdna", num_classes=num_classes, in_chans=in_chans, width=width,
                  small_stem=small_stem)
    config = reference_config(gate_norm, kernel_sizes=(1,), stage_depth=2,
                              reductions={r"\.pwconv1$": EXPAND_REDUCTION, r"\.pwconv2$": PROJECT_REDUCTION})
    net = ConvNeXt(num_classes=num_classes, in_chans=in_chans, width=width, small_stem=small_stem,
                   drop_path=drop_path)
    return Reference(net, reference_families(), config)


def default_sharing() -> KDNAConfig:
    """torchvision's pointwise layers are nn.Linear, which transform does not share: the depthwise 7x7 convs of
    each stage share one kernel (``only_if_smaller`` leaves the full-size model unchanged, docs/models.md)."""
    return KDNAConfig(kernel_sizes=(7,), depthwise=True, stage_depth=2)


FEATURES = ("features.1", "features.3", "features.5", "features.7")  # the four stages (reductions 4 to 32)
# KernelWarehouse's default sharing (convs reading the same width) would give the nine depthwise 7x7 convs of a
# stage one warehouse whose attention costs ~80x its kernels (kdna_fx.peers refuses it): one warehouse per layer.
register_arch(Arch("convnext_tiny", plain, reference, default_sharing, FEATURES, FEATURES, first_conv="features.0.0",
                   classifier="classifier.2", peer_options={"kernelwarehouse": {"sharing": "layer"}}))
