"""Small models and helpers for testing kdna_fx (and for users' own property tests)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .adapters import Gate, adapter_parameters
from .record import record_of


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, padding_mode: str = "zeros"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False, padding_mode=padding_mode)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False, padding_mode=padding_mode)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


class TinyResNet(nn.Module):
    """A two-stage ResNet small enough for property tests and quick compiles."""

    def __init__(self, width: int = 8, in_chans: int = 3, num_classes: int = 5, padding_mode: str = "zeros"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1, padding_mode),
                                    BasicBlock(width, width, 1, padding_mode))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2, padding_mode),
                                    BasicBlock(2 * width, 2 * width, 1, padding_mode))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@dataclass(frozen=True)
class ConvSpec:
    """One conv of a ConvStack: any geometry nn.Conv2d supports, channels kept fixed along the stack."""

    kernel: int = 3
    stride: int = 1
    padding: int | str = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    padding_mode: str = "zeros"


class ConvStack(nn.Module):
    """Convs of identical (C, C, k, groups, dilation, padding_mode) families, each followed by tanh.

    A residual edge reads every conv's input too, so a gate that leaked onto that tensor would show.
    Size-preserving convs (stride 1) add their input; the others add its spatial mean.
    """

    def __init__(self, channels: int, specs: Sequence[ConvSpec]):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, s.kernel, s.stride, s.padding, s.dilation,
                                             s.groups, s.bias, s.padding_mode) for s in specs)
        self.keeps_size = [s.stride == 1 and s.padding in ("same", s.dilation * (s.kernel - 1) // 2) for s in specs]

    def forward(self, x: Tensor) -> Tensor:
        for conv, keeps_size in zip(self.convs, self.keeps_size):
            y = torch.tanh(conv(x))
            x = y + (x if keeps_size else x.mean(dim=(2, 3), keepdim=True))
        return x


class FunctionalConvNet(nn.Module):
    """Convs written as F.conv2d calls on parameters (no nn.Conv2d), with a residual."""

    def __init__(self, channels: int = 4, n: int = 3):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.2) for _ in range(n))
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        for i, w in enumerate(self.weights):
            x = x + torch.tanh(F.conv2d(x, w, self.bias if i == 0 else None, padding=1))
        return x


def randomize_adapters(model: nn.Module, scale: float = 0.3, generator: torch.Generator | None = None) -> None:
    """Give every adapter parameter (F, S, gate weights and biases) random, non-trivial values, and every gate
    BatchNorm random running statistics (so that eval mode and folding see non-trivial ones)."""
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
        for module in model.modules():
            if isinstance(module, Gate) and isinstance(module.norm, nn.BatchNorm1d):
                stats = module.norm
                stats.running_mean.copy_(torch.randn(stats.running_mean.shape, generator=generator) * scale)
                stats.running_var.copy_(torch.rand(stats.running_var.shape, generator=generator) + 0.5)


def untie_parents(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, list[str]]]:
    """A copy of a transformed model in which every child reads its own copy of its parent's kernel.

    Returns the copy and, for each parent weight name, the names of the untied copies. Used to check
    that the tied kernel's gradient is the sum of the gradients through all of its users.
    """
    import copy

    gm = copy.deepcopy(gm)
    plan = record_of(gm).plan
    copies: dict[str, list[str]] = {}
    for node in list(gm.graph.nodes):
        meta = node.meta.get("kdna", {})
        if meta.get("role") != "child_conv":
            continue
        family = plan.family_of(meta["child"])
        if family is None or family.self_adapted:
            continue
        parent_name = plan.parent_weight(family)
        untied = f"untied_{meta['child'].replace('.', '_')}"
        gm.register_parameter(untied, nn.Parameter(gm.get_parameter(parent_name).detach().clone()))
        with gm.graph.inserting_before(node):
            node.replace_input_with(node.args[1], gm.graph.get_attr(untied))
        copies.setdefault(parent_name, []).append(untied)
    gm.graph.lint()
    gm.recompile()
    return gm, copies


def output_tensors(out: object) -> list[torch.Tensor]:
    """Every floating-point tensor of a model's output, in order: tensors, tuples, lists, dicts and dict-like
    outputs (Hugging Face's ModelOutput); for comparing models whose outputs are structures."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "keys") and hasattr(out, "__getitem__"):
        return [t for k in out.keys() for t in output_tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in output_tensors(item)]
    return []


__all__ = ["BasicBlock", "ConvSpec", "ConvStack", "FunctionalConvNet", "TinyResNet", "output_tensors",
           "randomize_adapters", "untie_parents"]
