"""The dynamic-convolution layers of CondConv, DY-Conv and ODConv: each computes its attentions and builds one
kernel per sample through kdna_fx.peers.functional (KernelWarehouse's layer is in kdna_fx.peers.warehouse)."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import gate_width
from . import functional as PF

Init = Literal["copy", "scratch"]
_NOISE = 0.01
"""CondConv "copy" init: std of the expert perturbation, relative to the kernel's std."""


def _head_width(in_channels: int, reduction: float, minimum: int = 16) -> int:
    """ODConv's and KernelWarehouse's attention width: max(int(C_in * reduction), minimum)."""
    return max(int(in_channels * reduction), minimum)


def _copy_geometry(layer: nn.Module, conv: nn.Conv2d) -> None:
    """The conv's shape and call arguments, which every peer layer keeps."""
    layer.in_channels, layer.out_channels = conv.in_channels, conv.out_channels
    layer.kernel_size = tuple(conv.kernel_size)
    layer.stride, layer.padding, layer.dilation = conv.stride, conv.padding, conv.dilation
    layer.groups, layer.padding_mode = conv.groups, conv.padding_mode


class PeerConv2d(nn.Module):
    """K expert kernels ``weight`` [K, C_out, C_in/g, k, k] (and biases [K, C_out]) in place of one nn.Conv2d.

    Subclasses add the attention head (``attentions``); the kernel math is kdna_fx.peers.functional's.
    ``init="copy"`` starts every expert from the conv's kernel and bias; ``"scratch"`` draws each expert
    independently (Kaiming normal, fan_out, as torchvision's ResNets initialise convs) with zero bias.
    """

    kdna_adds_macs: ClassVar[bool] = True
    """Its MACs other than convolutions are the conversion's overhead (kdna_fx.reporting.count_macs)."""

    def __init__(self, conv: nn.Conv2d, kernels: int, init: Init):
        super().__init__()
        _copy_geometry(self, conv)
        self.kernels = kernels
        weight = conv.weight.detach()
        self.weight = nn.Parameter(weight.expand(kernels, *weight.shape).clone(memory_format=torch.contiguous_format))
        self.bias = (nn.Parameter(conv.bias.detach().expand(kernels, -1).clone())
                     if conv.bias is not None else None)
        if init == "scratch":
            with torch.no_grad():
                for expert in self.weight:
                    nn.init.kaiming_normal_(expert, mode="fan_out", nonlinearity="relu")
                if self.bias is not None:
                    self.bias.zero_()

    def _factory(self) -> dict[str, Any]:
        return dict(device=self.weight.device, dtype=self.weight.dtype)

    def attentions(self, x: Tensor) -> dict[str, Tensor]:
        """The keyword attentions of peers.functional.dynamic_conv2d for input ``x``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return PF.dynamic_conv2d(x, self.weight, bias=self.bias, stride=self.stride, padding=self.padding,
                                 dilation=self.dilation, groups=self.groups, padding_mode=self.padding_mode,
                                 **self.attentions(x))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, kernels={self.kernels}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}")


class CondConv2d(PeerConv2d):
    """CondConv (Yang et al., NeurIPS 2019): W(x) = sum_k r_k(x) W_k, r(x) = sigmoid(routing(mean_hw(x))).

    With ``init="copy"`` the routing starts at zero (r_k = 1/2 for every sample) and expert k at
    (2/K)(W + e_k), the e_k small noise centred over the experts: the mixture is exactly W, while the
    experts differ, without which identical experts under identical routing would stay identical forever.
    """

    def __init__(self, conv: nn.Conv2d, experts: int = 4, init: Init = "copy"):
        super().__init__(conv, experts, init)
        self.routing = nn.Linear(self.in_channels, experts, **self._factory())
        if init == "copy":
            with torch.no_grad():
                self.routing.weight.zero_()
                self.routing.bias.zero_()
                noise = torch.randn_like(self.weight) * (_NOISE * self.weight[0].std().nan_to_num())
                self.weight.add_(noise - noise.mean(0)).mul_(2.0 / experts)
                if self.bias is not None:
                    self.bias.mul_(2.0 / experts)

    def attentions(self, x: Tensor) -> dict[str, Tensor]:
        return {"kernel_attention": torch.sigmoid(self.routing(x.mean((2, 3))))}


class DynamicConv2d(PeerConv2d):
    """DY-Conv (Chen et al., CVPR 2020): W(x) = sum_k pi_k(x) W_k, pi = softmax(fc2(relu(fc1(mean_hw(x)))) / T).

    T lives in the ``temperature`` buffer (the paper anneals it from 30 to 1 over the first epochs:
    ``set_temperature``; a buffer, so changing it never recompiles). With ``init="copy"`` the model's
    function is unchanged at init: the experts are equal and the attentions sum to 1.
    """

    def __init__(self, conv: nn.Conv2d, kernels: int = 4, init: Init = "copy", temperature: float = 30.0,
                 reduction: int = 4):
        super().__init__(conv, kernels, init)
        hidden = gate_width(self.in_channels, reduction)
        self.fc1 = nn.Linear(self.in_channels, hidden, bias=False, **self._factory())
        self.fc2 = nn.Linear(hidden, kernels, **self._factory())
        self.register_buffer("temperature", torch.tensor(float(temperature), **self._factory()))

    def attentions(self, x: Tensor) -> dict[str, Tensor]:
        z = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        return {"kernel_attention": torch.softmax(z / self.temperature, dim=1)}


class ODConv2d(PeerConv2d):
    """ODConv (Li, Yao and Yao, ICLR 2022): W(x) = a_f(x) * a_c(x) * a_s(x) * sum_k a_w,k(x) W_k.

    One head, h = relu(bn(fc(mean_hw(x)))) with width max(C_in * reduction, 16), feeds four attentions:
    channel sigmoid [B, C_in], filter sigmoid [B, C_out], spatial sigmoid [B, k*k] (none for 1x1 kernels)
    and kernel softmax [B, K] (none for K = 1), every logit divided by the ``temperature`` buffer. As in
    the original, a depthwise conv gets no filter attention (it would repeat the channel one). The
    attentions lie in (0, 1), so even ``init="copy"`` does not keep the model's function.
    """

    def __init__(self, conv: nn.Conv2d, kernel_num: int = 1, init: Init = "copy", reduction: float = 0.0625,
                 temperature: float = 1.0, min_hidden: int = 16):
        super().__init__(conv, kernel_num, init)
        kh, kw = self.kernel_size
        hidden = _head_width(self.in_channels, reduction, min_hidden)
        depthwise = self.groups == self.in_channels == self.out_channels
        factory = self._factory()
        self.fc = nn.Linear(self.in_channels, hidden, bias=False, **factory)
        self.bn = nn.BatchNorm1d(hidden, **factory)
        self.channel_fc = nn.Linear(hidden, self.in_channels, **factory)
        self.filter_fc = None if depthwise else nn.Linear(hidden, self.out_channels, **factory)
        self.spatial_fc = nn.Linear(hidden, kh * kw, **factory) if kh * kw > 1 else None
        self.kernel_fc = nn.Linear(hidden, kernel_num, **factory) if kernel_num > 1 else None
        self.register_buffer("temperature", torch.tensor(float(temperature), **factory))

    def attentions(self, x: Tensor) -> dict[str, Tensor]:
        h = self.fc(x.mean((2, 3)))
        if self.training:
            h = PF.require_batch_statistics(h, "ODConv")
        h = F.relu(self.bn(h))
        out = {"channel_attention": torch.sigmoid(self.channel_fc(h) / self.temperature)}
        if self.filter_fc is not None:
            out["filter_attention"] = torch.sigmoid(self.filter_fc(h) / self.temperature)
        if self.spatial_fc is not None:
            out["spatial_attention"] = torch.sigmoid(self.spatial_fc(h) / self.temperature)
        if self.kernel_fc is not None:
            out["kernel_attention"] = torch.softmax(self.kernel_fc(h) / self.temperature, dim=1)
        return out
