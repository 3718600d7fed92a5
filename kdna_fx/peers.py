"""KernelDNA's dynamic-convolution peers as transforms: CondConv, DY-Conv and ODConv.

    cmodel = kdna_fx.peers.condconv(model, experts=4)     # routed mixture of 4 expert kernels
    dmodel = kdna_fx.peers.dyconv(model, kernels=4)       # softmax attention over 4 kernels, temperature 30
    omodel = kdna_fx.peers.odconv(model, kernel_num=1)    # ODConv 1x: channel, filter, spatial attentions
    print(kdna_fx.peers.describe(omodel))                 # parameters and MACs before/after

Each traces the model like kdna_fx.transform (same tracing, same conv eligibility through KDNAConfig) and
swaps every eligible nn.Conv2d for a peer module that builds one kernel per sample and runs the batch as
one grouped convolution (kdna_fx.peer_functional). They exist to be compared with KernelDNA. See
docs/peers.md for the equations, the initialisations and what the reports count.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import passes
from . import peer_functional as PF
from ._pipeline import prepare
from .adapters import gate_width
from .config import KDNAConfig
from .datamodel import peer_record
from .errors import ConfigError, KDNAError, KDNATypeError
from .reporting import cost_table, flop_counts
from .utils import to_model

Init = Literal["copy", "scratch"]
_NOISE = 0.01
"""CondConv "copy" init: std of the expert perturbation, relative to the kernel's std."""


class PeerConv2d(nn.Module):
    """K expert kernels ``weight`` [K, C_out, C_in/g, k, k] (and biases [K, C_out]) in place of one nn.Conv2d.

    Subclasses add the attention head (``attentions``); the kernel math is kdna_fx.peer_functional's.
    ``init="copy"`` starts every expert from the conv's kernel and bias; ``"scratch"`` draws each expert
    independently (Kaiming normal, fan_out, as torchvision's ResNets initialise convs) with zero bias.
    """

    def __init__(self, conv: nn.Conv2d, kernels: int, init: Init):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups, self.padding_mode = conv.groups, conv.padding_mode
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
        """The keyword attentions of peer_functional.dynamic_conv2d for input ``x``."""
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
        hidden = max(int(self.in_channels * reduction), min_hidden)
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
            h = PF.require_batch_statistics(h)
        h = F.relu(self.bn(h))
        out = {"channel_attention": torch.sigmoid(self.channel_fc(h) / self.temperature)}
        if self.filter_fc is not None:
            out["filter_attention"] = torch.sigmoid(self.filter_fc(h) / self.temperature)
        if self.spatial_fc is not None:
            out["spatial_attention"] = torch.sigmoid(self.spatial_fc(h) / self.temperature)
        if self.kernel_fc is not None:
            out["kernel_attention"] = torch.softmax(self.kernel_fc(h) / self.temperature, dim=1)
        return out


# ---- transforms ------------------------------------------------------------------------------------------
def _count(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1 (the number of expert kernels per conv), got {value!r}; "
                          f"the papers use 4 or 8")
    return value


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _convert(model: nn.Module, config: KDNAConfig | None, init: str, method: str,
             make: Callable[[nn.Conv2d], nn.Module]) -> nn.Module:
    if init not in ("copy", "scratch"):
        raise ConfigError(f"init must be 'copy' (experts start from the model's kernels) or 'scratch' (each expert "
                          f"freshly drawn, as the papers train), got {init!r}")
    if config is not None and not isinstance(config, KDNAConfig):
        raise KDNATypeError(f"config must be a kdna_fx.KDNAConfig, got {type(config).__name__}")
    # The adapter-cost rule compares a KernelDNA adapter with a kernel; it means nothing for a peer.
    config = dataclasses.replace(config or KDNAConfig(), only_if_smaller=False)
    # The transform's own pipeline: the same convs, on a trusted graph or by module swap.
    prepared = prepare(model, config, gates=False)
    return passes.swap_convs(prepared.target, prepared.sites, prepared.skipped, make, method)


def condconv(model: nn.Module, experts: int = 4, config: KDNAConfig | None = None, *,
             init: Init = "copy") -> nn.Module:
    """A copy of ``model`` whose eligible convs (as for kdna_fx.transform under ``config``) are CondConv layers
    with ``experts`` expert kernels each."""
    _count("experts", experts)
    return _convert(model, config, init, f"CondConv (K={experts})", lambda c: CondConv2d(c, experts, init))


def dyconv(model: nn.Module, kernels: int = 4, config: KDNAConfig | None = None, *, temperature: float = 30.0,
           reduction: int = 4, init: Init = "copy") -> nn.Module:
    """A copy of ``model`` whose eligible convs are DY-Conv layers with ``kernels`` kernels each, attention
    width C_in // ``reduction`` and softmax ``temperature`` (anneal it with ``set_temperature``)."""
    _count("kernels", kernels)
    _count("reduction", reduction)
    temperature = _positive("temperature", temperature)
    return _convert(model, config, init, f"DY-Conv (K={kernels})",
                    lambda c: DynamicConv2d(c, kernels, init, temperature, reduction))


def odconv(model: nn.Module, kernel_num: int = 1, config: KDNAConfig | None = None, *, reduction: float = 0.0625,
           temperature: float = 1.0, init: Init = "copy") -> nn.Module:
    """A copy of ``model`` whose eligible convs are ODConv layers ("ODConv {kernel_num}x"), attention width
    max(C_in * ``reduction``, 16)."""
    _count("kernel_num", kernel_num)
    reduction = _positive("reduction", reduction)
    temperature = _positive("temperature", temperature)
    return _convert(model, config, init, f"ODConv {kernel_num}x",
                    lambda c: ODConv2d(c, kernel_num, init, reduction, temperature))


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set the softmax temperature of every DY-Conv and ODConv layer of ``model`` in place (the annealing
    schedule); returns how many layers were changed."""
    temperature = _positive("temperature", temperature)
    layers = [m for m in model.modules() if isinstance(m, (DynamicConv2d, ODConv2d))]
    for layer in layers:
        layer.temperature.fill_(temperature)
    return len(layers)


# ---- report ------------------------------------------------------------------------------------------------
@dataclass
class PeerReport:
    """Parameters and MACs of a converted model before and after; MACs of one eval forward of one input."""

    method: str
    input_shape: tuple[int, ...]
    converted: list[str]
    skipped: list[dict[str, str]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        table = cost_table(self.params_before, self.params_after, self.macs_before, self.macs_after, shape,
                           f"kdna_fx.peers: {self.method}, {len(self.converted)} convs converted")
        note = ("MACs: convolutions and matrix products (torch.utils.flop_counter), the attention heads and the "
                "kernel mixture included; elementwise attention products are not counted.")
        skipped = [f"  skipped {s['name']}: {s['reason']}" for s in self.skipped]
        return "\n".join([table, note, *skipped])


def peer_macs(model: nn.Module, example_input: Tensor) -> tuple[int, int]:
    """(total MACs, MACs the peers add: heads and kernel mixtures) of one eval forward of ``example_input``.

    A per-sample grouped convolution counts exactly as the conv it replaces at the same batch size (the
    counter multiplies the grouped kernel [B*C_out, ...] by the input batch 1), so every MAC inside a peer
    that is not its convolution is added by the peer.
    """
    total, by_module = flop_counts(model, example_input)
    peers = {name for name, m in model.named_modules() if isinstance(m, PeerConv2d)}
    added = sum(flops for name, ops in by_module.items() if name in peers
                for op, flops in ops.items() if op is not torch.ops.aten.convolution)
    return total // 2, added // 2


def describe(model: nn.Module, example_input: Tensor | None = None) -> PeerReport:
    """Parameters and MACs of a model converted by condconv/dyconv/odconv, before and after (print it for a
    table). ``example_input`` defaults to one 224x224 image."""
    record = peer_record(model)
    if record is None:
        raise KDNAError(f"{type(model).__name__} was not converted by kdna_fx.peers; call kdna_fx.peers.condconv, "
                        f"dyconv or odconv first")
    if example_input is None:
        example_input = torch.randn(1, record.in_channels or 3, 224, 224)
    example_input = to_model(example_input, model)
    total, added = peer_macs(model, example_input)
    return PeerReport(method=record.method, input_shape=tuple(example_input.shape), converted=list(record.converted),
                      skipped=[{"name": s.name, "reason": s.reason} for s in record.skipped],
                      params_before=record.params_before, params_after=sum(p.numel() for p in model.parameters()),
                      macs_before=total - added, macs_after=total)


__all__ = ["CondConv2d", "DynamicConv2d", "ODConv2d", "PeerConv2d", "PeerReport", "condconv", "describe", "dyconv",
           "odconv", "peer_macs", "set_temperature"]
