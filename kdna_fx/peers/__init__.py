"""KernelDNA's dynamic-convolution peers as transforms: CondConv, DY-Conv, ODConv and KernelWarehouse.

    cmodel = kdna_fx.peers.condconv(model, experts=4)     # routed mixture of 4 expert kernels
    dmodel = kdna_fx.peers.dyconv(model, kernels=4)       # softmax attention over 4 kernels, temperature 30
    omodel = kdna_fx.peers.odconv(model, kernel_num=1)    # ODConv 1x: channel, filter, spatial attentions
    kmodel = kdna_fx.peers.kernelwarehouse(model, 1)      # KernelWarehouse 1x: kernel cells from shared warehouses
    print(kdna_fx.peers.describe(omodel))                 # parameters and MACs before/after

Each traces the model like kdna_fx.transform (same tracing, same conv eligibility through KDNAConfig) and
swaps every eligible nn.Conv2d for a peer module that builds one kernel per sample and runs the batch as
one grouped convolution (kdna_fx.peers.functional). They exist to be compared with KernelDNA. See
docs/peers.md for the equations, the initialisations and what the reports count.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from torch import Tensor, nn

from .. import passes
from .._pipeline import prepare
from ..config import KDNAConfig
from ..datamodel import peer_record
from ..errors import ConfigError, KDNAError, KDNATypeError
from ..reporting import Report, report
from .layers import CondConv2d, DynamicConv2d, Init, ODConv2d, PeerConv2d
from .warehouse import KWConv2d, Sharing, Warehouse, _ratio_label, _sharing_key, _stock_warehouses, _warehouse_ratio


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
