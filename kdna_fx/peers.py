"""KernelDNA's dynamic-convolution peers as transforms: CondConv, DY-Conv, ODConv and KernelWarehouse.

    cmodel = kdna_fx.peers.condconv(model, experts=4)     # routed mixture of 4 expert kernels
    dmodel = kdna_fx.peers.dyconv(model, kernels=4)       # softmax attention over 4 kernels, temperature 30
    omodel = kdna_fx.peers.odconv(model, kernel_num=1)    # ODConv 1x: channel, filter, spatial attentions
    kmodel = kdna_fx.peers.kernelwarehouse(model, 1)      # KernelWarehouse 1x: kernel cells from shared warehouses
    print(kdna_fx.peers.describe(omodel))                 # parameters and MACs before/after

Each traces the model like kdna_fx.transform (same tracing, same conv eligibility through KDNAConfig) and
swaps every eligible nn.Conv2d for a peer module that builds one kernel per sample and runs the batch as
one grouped convolution (kdna_fx.peer_functional). They exist to be compared with KernelDNA. See
docs/peers.md for the equations, the initialisations and what the reports count.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from fractions import Fraction
from typing import Any, Callable, ClassVar, Literal, Union

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
from .reporting import Report, report

Init = Literal["copy", "scratch"]
Sharing = Union[Literal["input", "stage", "layer"], Callable[[str, nn.Module], Hashable]]
_NOISE = 0.01
"""CondConv "copy" init: std of the expert perturbation, relative to the kernel's std."""
_MAX_HEADS = 1_000_000
"""KernelWarehouse: a group's attention heads may exceed ten times its kernels' parameters up to this many."""


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

    Subclasses add the attention head (``attentions``); the kernel math is kdna_fx.peer_functional's.
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


class Warehouse(nn.Module):
    """The n kernel cells [n, c_out, c_in] that the KernelWarehouse layers of one group mix their kernels from.

    Registered (as ``warehouse``) under the first layer of its group only, so its parameter has one name in the
    state dict; the other layers reach it through an unregistered reference.
    """

    def __init__(self, cells: Tensor):
        super().__init__()
        self.cells = nn.Parameter(cells)

    def extra_repr(self) -> str:
        n, co, ci = self.cells.shape
        return f"cells={n}, cell_shape=({co}, {ci})"


class KWConv2d(nn.Module):
    """KernelWarehouse (Li and Yao, ICML 2024) in place of one nn.Conv2d; built by ``kernelwarehouse``.

    The kernel [C_out, C_in/g, kh, kw] is cut into m cells [c_out, c_in], one kernel position each (kernel
    partition). Cell j of sample b's kernel is sum_c alpha[b, j, c] E_c over the n cells E of the warehouse its
    group shares (warehouse sharing). alpha is the contrasting-driven attention (peer_functional.
    warehouse_attention) of a head h = fc2(relu(bn(fc1(mean_hw(x))))), fc1 of width max(int(C_in *
    reduction), 16), fc2 giving m*(n+1) logits, mixed with the one-hot initial attention ``init_attention``
    by the ``temperature`` buffer tau (1 at start, lowered to 0 early in training: ``set_temperature``).
    The conv's bias, if any, stays a static bias.
    """

    kdna_adds_macs: ClassVar[bool] = True
    """Its MACs other than convolutions are the conversion's overhead (kdna_fx.reporting.count_macs)."""

    def __init__(self, conv: nn.Conv2d, init: Init = "copy"):
        super().__init__()
        _copy_geometry(self, conv)
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        # Kept until _stock_warehouses has cut it into the warehouse ("copy") or drawn fresh cells ("scratch").
        self._kernel: Tensor | None = conv.weight.detach()
        self._init = init
        self._shared: tuple[Warehouse, ...] = ()

    def _stock(self, warehouse: Warehouse, owner: bool, init_attention: Tensor, reduction: float) -> None:
        """Attach the group's ``warehouse`` (registered here if ``owner``) and build the attention head."""
        factory = dict(device=self._kernel.device, dtype=self._kernel.dtype)
        hidden = _head_width(self.in_channels, reduction)
        self.fc1 = nn.Linear(self.in_channels, hidden, bias=False, **factory)
        self.bn = nn.BatchNorm1d(hidden, **factory)
        self.fc2 = nn.Linear(hidden, init_attention.numel(), **factory)
        for fc in (self.fc1, self.fc2):  # the paper's head initialisation
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc2.bias)
        # Derived from the warehouse layout, not learned: rebuilt by every conversion, so not saved.
        self.register_buffer("init_attention", init_attention.to(**factory), persistent=False)
        self.register_buffer("temperature", torch.tensor(1.0, **factory))
        if owner:
            self.warehouse = warehouse
        self._shared = (warehouse,)
        self._kernel = None

    @property
    def cells(self) -> Tensor:
        """The cells of the warehouse this layer mixes from, [n, c_out, c_in]."""
        if not self._shared:
            raise KDNAError("this KWConv2d has no warehouse yet: build KernelWarehouse layers with "
                            "kdna_fx.peers.kernelwarehouse(model, ...)")
        return self._shared[0].cells

    def attention(self, x: Tensor) -> Tensor:
        """The cell attentions [B, m, n] for input ``x``."""
        h = self.fc1(x.mean((2, 3)))
        if self.training:
            h = PF.require_batch_statistics(h, "KernelWarehouse")
        return PF.warehouse_attention(self.fc2(F.relu(self.bn(h))), self.init_attention, self.temperature)

    def forward(self, x: Tensor) -> Tensor:
        return PF.warehouse_conv2d(x, self.cells, self.attention(x), self.out_channels, self.kernel_size,
                                   self.bias, self.stride, self.padding, self.dilation, self.groups,
                                   self.padding_mode)

    def extra_repr(self) -> str:
        cells = "" if not self._shared else f", cells={tuple(self.cells.shape)}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}{cells}")


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
    # The transform's own pipeline: the same convs, swapped in the model's own module tree.
    prepared = prepare(model, config, gates=False)
    return passes.swap_convs(prepared.module, prepared.sites, prepared.skipped, make, method)


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


def _warehouse_ratio(ratio: object) -> Fraction:
    """The paper's "b" (warehouse cells per layer cell) as an exact fraction: an integer k >= 1 or 1/k."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, Fraction)) or not 0 < ratio < math.inf:
        raise ConfigError(f"ratio must be a positive number (warehouse cells per kernel cell: 1 for "
                          f"KernelWarehouse 1x, 4 for 4x, 0.25 for 1/4x), got {ratio!r}")
    exact = Fraction(ratio).limit_denominator(1000)
    if abs(float(exact) - float(ratio)) > 1e-9 or (exact.numerator != 1 and exact.denominator != 1):
        raise ConfigError(f"ratio must be an integer k >= 1 or 1/k (the paper's 1/4x, 1/2x, 1x, 2x, 4x), got "
                          f"{ratio!r}: the initial attention gives k cells to a kernel cell or one cell to k of them")
    return exact


def _ratio_label(ratio: Fraction) -> str:
    return f"{ratio.numerator}x" if ratio.denominator == 1 else f"1/{ratio.denominator}x"


def _cell_channels(gcd: int, fraction: float) -> int:
    """The largest divisor of ``gcd`` not above gcd * fraction (at least 1): cells tile every layer of the group."""
    return max(d for d in range(1, gcd + 1) if gcd % d == 0 and d <= max(gcd * fraction, 1))


def _sharing_key(sharing: Sharing, config: KDNAConfig) -> Callable[[str, KWConv2d], Hashable]:
    """Name and layer -> warehouse key. Depthwise and other convs never share: their cells would be 1 channel."""
    if callable(sharing):
        return sharing
    if sharing == "input":
        return lambda name, layer: ("input", layer.in_channels, layer.in_channels == layer.groups > 1)
    if sharing == "stage":
        return lambda name, layer: ("stage", config.stage_of(name), layer.in_channels == layer.groups > 1)
    if sharing == "layer":
        return lambda name, layer: ("layer", name)
    raise ConfigError(f"sharing must be 'input' (one warehouse per input width: the paper's stages on ResNets), "
                      f"'stage' (KDNAConfig.stage_of), 'layer' (no sharing) or a function (name, layer) -> key, "
                      f"got {sharing!r}")


def _stock_warehouses(model: nn.Module, ratio: Fraction, cell_fraction: float,
                      key: Callable[[str, KWConv2d], Hashable], reduction: float) -> None:
    """Give every KWConv2d of ``model`` its group's warehouse and its initial attention.

    Per group: cells [c_out, c_in] from the greatest common divisors of the members' output channels and input
    channels per group (times ``cell_fraction``); every member owns a slice of the warehouse, initialised from its
    own kernel ("copy") or Kaiming normal (fan_out, "scratch"), and its one-hot initial attention points each of
    its kernel cells at a cell of that slice: cell j to slice cell j*b for a ratio b >= 1; for b = 1/k only the
    kernel cells with j % k == (j // k) % k get a cell, the others the zero cell (the paper's initialisation).
    """
    groups: dict[Hashable, list[KWConv2d]] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, KWConv2d) and not layer._shared:
            groups.setdefault(key(name, layer), []).append(layer)
    for group, members in groups.items():
        cell_out = _cell_channels(math.gcd(*(m.out_channels for m in members)), cell_fraction)
        cell_in = _cell_channels(math.gcd(*(m.in_channels // m.groups for m in members)), cell_fraction)
        slots, slices, start = [], [], 0
        for layer in members:
            cells = layer.out_channels // cell_out * (layer.in_channels // layer.groups // cell_in) * math.prod(
                layer.kernel_size)
            if ratio.denominator == 1:
                own = [start + j * ratio.numerator for j in range(cells)]
                size = cells * ratio.numerator
            else:
                k, own, size = ratio.denominator, [], 0
                for j in range(cells):
                    own.append(start + size if j % k == (j // k) % k else None)
                    size += own[-1] is not None
            slots.append(own)
            slices.append((start, start + size))
            start += size
        heads = sum(len(own) * (start + 1) * (_head_width(m.in_channels, reduction) + 1)
                    for m, own in zip(members, slots))
        kernels = sum(m._kernel.numel() for m in members)
        if heads > max(10 * kernels, _MAX_HEADS):  # a group too wide: its heads would not fit in memory
            raise ConfigError(
                f"KernelWarehouse: the {len(members)} convs sharing one warehouse (key {group!r}) would need "
                f"{heads:,} attention parameters for {kernels:,} kernel parameters (cells {cell_out}x{cell_in}, "
                f"{start} of them): every kernel cell has one logit per warehouse cell. Share among fewer convs "
                f"(sharing='input' or 'layer') or use larger cells (cell_fraction closer to 1).")
        kernel = members[0]._kernel
        warehouse = torch.empty(start, cell_out, cell_in, device=kernel.device, dtype=kernel.dtype)
        for layer, own, (lo, hi) in zip(members, slots, slices):
            fan_out = layer.out_channels * math.prod(layer.kernel_size)
            nn.init.normal_(warehouse[lo:hi], std=nn.init.calculate_gain("relu") / math.sqrt(fan_out))
            if layer._init == "copy":
                taken = [j for j, c in enumerate(own) if c is not None]
                warehouse[[own[j] for j in taken]] = PF.kernel_cells(layer._kernel, cell_out, cell_in)[taken]
        shared = Warehouse(warehouse)
        for i, (layer, own) in enumerate(zip(members, slots)):
            init_attention = torch.zeros(len(own), start + 1)
            init_attention[torch.arange(len(own)), [start if c is None else c for c in own]] = 1.0
            layer._stock(shared, i == 0, init_attention, reduction)


def kernelwarehouse(model: nn.Module, ratio: float = 1, config: KDNAConfig | None = None, *,
                    cell_fraction: float = 1.0, sharing: Sharing = "input", reduction: float = 0.0625,
                    init: Init = "copy") -> nn.Module:
    """A copy of ``model`` whose eligible convs are KernelWarehouse layers ("KernelWarehouse {ratio}x").

    ``ratio``: warehouse cells per kernel cell (the paper's 1/4x, 1x, 4x: 0.25, 1, 4), so the warehouses hold
    ``ratio`` times the converted kernels' parameters. ``cell_fraction``: cell channels as a fraction of the
    greatest common divisor of a group's channels (the paper's 1/4x uses 0.5). ``sharing``: which convs share a
    warehouse; "input" (default) groups convs that read the same number of channels, which on a ResNet is the
    paper's grouping (a stage's warehouse also serves the next stage's strided first conv and downsample).
    ``reduction``: attention width max(int(C_in * reduction), 16). The paper converts 1x1 convs too:
    ``config=KDNAConfig(kernel_sizes=(1, 3))``.
    """
    exact = _warehouse_ratio(ratio)
    if isinstance(cell_fraction, bool) or not isinstance(cell_fraction, (int, float)) or not 0 < cell_fraction <= 1:
        raise ConfigError(f"cell_fraction must be a number in (0, 1] (cell channels as a fraction of the group's "
                          f"greatest common divisor; the paper's 1/4x uses 0.5), got {cell_fraction!r}")
    reduction = _positive("reduction", reduction)
    key = _sharing_key(sharing, config if config is not None else KDNAConfig())
    converted = _convert(model, config, init, f"KernelWarehouse {_ratio_label(exact)}", lambda c: KWConv2d(c, init))
    _stock_warehouses(converted, exact, float(cell_fraction), key, reduction)
    return converted


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set the ``temperature`` buffer of every DY-Conv, ODConv and KernelWarehouse layer of ``model`` in place
    (the annealing schedule); returns how many layers were changed.

    DY-Conv and ODConv divide their logits by it (> 0; DY-Conv's paper anneals 30 -> 1). KernelWarehouse mixes
    its initial attention in with it (tau in [0, 1]; its paper lowers it linearly from 1 to 0 early in training).
    """
    layers = [m for m in model.modules() if isinstance(m, (DynamicConv2d, ODConv2d, KWConv2d))]
    if any(isinstance(m, KWConv2d) for m in layers):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1:
            raise ConfigError(f"temperature must be in [0, 1] for KernelWarehouse layers (the weight of the initial "
                              f"attention, lowered from 1 to 0), got {temperature!r}")
    if any(not isinstance(m, KWConv2d) for m in layers):
        _positive("temperature", temperature)
    for layer in layers:
        layer.temperature.fill_(float(temperature))
    return len(layers)


# ---- report ------------------------------------------------------------------------------------------------
def describe(model: nn.Module, example_input: Tensor | None = None) -> Report:
    """Parameters and MACs of a model converted by condconv/dyconv/odconv/kernelwarehouse, before and after: the
    kdna_fx.reporting.Report that kdna_fx.report gives for it (print it for a table), refusing any other model.
    ``example_input`` defaults to one 224x224 image."""
    if peer_record(model) is None:
        raise KDNAError(f"{type(model).__name__} was not converted by kdna_fx.peers; call kdna_fx.peers.condconv, "
                        f"dyconv, odconv or kernelwarehouse first")
    return report(model, example_input)


__all__ = ["CondConv2d", "DynamicConv2d", "KWConv2d", "ODConv2d", "PeerConv2d", "Warehouse", "condconv", "describe",
           "dyconv", "kernelwarehouse", "odconv", "set_temperature"]
