"""Pass 2: find the conv modules (1-D, 2-D, 3-D) of a model and decide which may be shared.

What a conv module is is passes/sites.py's business; this pass applies the config's rules of eligibility."""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Iterable

from torch import nn

from kdna_fx.adapters import adapter_cost
from kdna_fx.config import KDNAConfig
from kdna_fx.datamodel import ConvSite, Skipped
from kdna_fx.registry import NOT_TRACED

from .sites import conv_module_site


def _split(found: list[ConvSite | Skipped | None], model: nn.Module,
           config: KDNAConfig) -> tuple[list[ConvSite], list[Skipped]]:
    """The found convs (None: not a conv) as eligible sites and skipped ones, in order."""
    tied = owners(model)
    sites: list[ConvSite] = []
    skipped: list[Skipped] = []
    for site in found:
        if site is None:
            continue
        reason = site.reason if isinstance(site, Skipped) else _ineligible(site, model, config, tied)
        if reason:
            skipped.append(Skipped(site.name, reason))
        else:
            sites.append(site)
    return sites, skipped


def find_modules(model: nn.Module, config: KDNAConfig,
                 order: Iterable[str] = ()) -> tuple[list[ConvSite], list[Skipped]]:
    """Every conv module of ``model``, split into eligible sites and skipped ones (with a reason). ``order``: conv
    names in run order (passes.routing); convs not in it follow in registration order. Convs inside an instance of a type tracing keeps opaque (kdna_fx.registry.NOT_TRACED,
    ``config.leaf_modules``) are left alone, as tracing would leave them.
    A conv module called several times is fine here: swapped, each call runs the same child."""
    modules = dict(model.named_modules())
    ran = [n for n in dict.fromkeys(order) if n in modules]
    names = ran + [n for n in modules if n not in set(ran)]
    opaque = tuple(NOT_TRACED) + tuple(config.leaf_modules)
    kept = [p for p, m in modules.items() if p and isinstance(m, opaque)]
    found: list[ConvSite | Skipped | None] = []
    for name in names:
        site = conv_module_site(name, modules[name], config)
        inside = next((p for p in kept if name.startswith(p + ".")), None)
        if site is not None and inside is not None:
            site = Skipped(name, f"inside {inside!r} ({type(modules[inside]).__name__}), which is kept opaque "
                                 f"(kdna_fx.registry.NOT_TRACED or KDNAConfig.leaf_modules)")
        found.append(site)
    return _split(found, model, config)


def first_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first convolution in registration order: the default example input of
    kdna_fx.report and of passes.lower's inferred inputs."""
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def owners(model: nn.Module) -> Counter:
    """How many distinct modules hold each parameter (by id). One module registered under several paths (an
    alias, as in MONAI's DynUNet) is one owner; a weight held by two modules is tied."""
    held = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            held.setdefault(id(p), set()).add(id(module))
    return Counter({key: len(mods) for key, mods in held.items()})


def _ineligible(site: ConvSite, gm: nn.Module, config: KDNAConfig, tied: Counter) -> str | None:
    if not config.shares_kernel(site.kernel_size):
        return f"kernel {'x'.join(map(str, site.kernel_size))} is not in kernel_sizes={config.kernel_sizes}"
    if site.groups > 1 and site.groups == site.in_channels == site.out_channels and not config.depthwise:
        return "depthwise conv (groups = C_in = C_out); opt in with KDNAConfig(depthwise=True)"
    dropped = config.selected(site.name)
    if dropped:
        return dropped
    if site.adapter is None:
        return "its adapter config is None (by_name, by_name_regex, by_type or the global adapter)"
    weight = gm.get_parameter(site.weight)
    if tied[id(weight)] > 1:
        return "its weight is tied to another parameter of the model"
    if config.share and config.only_if_smaller:
        cost = adapter_cost(site.in_channels, site.out_channels, site.kernel_size, groups=site.groups,
                            **dataclasses.asdict(site.adapter))
        if cost >= weight.numel():
            return (f"its adapter ({cost:,} params) would cost more than the kernel it shares "
                    f"({weight.numel():,}); set only_if_smaller=False to share anyway")
    return None
