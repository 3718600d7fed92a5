"""KernelWarehouse: its layer (KWConv2d), the warehouses of kernel cells its layers share, and the stocking of a
converted model's warehouses (kdna_fx.peers.kernelwarehouse calls it)."""
from __future__ import annotations

import math
from collections.abc import Hashable
from fractions import Fraction
from typing import Callable, ClassVar, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import KDNAConfig
from ..errors import ConfigError, KDNAError
from . import functional as PF
from .layers import Init, _copy_geometry, _head_width

Sharing = Union[Literal["input", "stage", "layer"], Callable[[str, nn.Module], Hashable]]
_MAX_HEADS = 1_000_000
"""KernelWarehouse: a group's attention heads may exceed ten times its kernels' parameters up to this many."""


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
    group shares (warehouse sharing). alpha is the contrasting-driven attention (peers.functional.
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
