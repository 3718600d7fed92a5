"""Pass 2: find the convolutions (any rank) of a traced graph (or of a model's modules); decide which may be shared.

What a conv call looks like is each handler's business (passes/sites.py); this pass applies the config's
rules of eligibility, which are the same for every kind."""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Iterable

from torch import fx, nn

from kdna_fx.adapters import adapter_cost
from kdna_fx.config import KDNAConfig
from kdna_fx.datamodel import ConvSite, Skipped
from kdna_fx.registry import NOT_TRACED

from .sites import HANDLERS, conv_arguments, conv_module_site, is_conv_call


def find_convs(gm: fx.GraphModule, config: KDNAConfig) -> tuple[list[ConvSite], list[Skipped]]:
    """Every conv node (1-D, 2-D, 3-D) in graph order, split into eligible sites and skipped ones (with a reason)."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    found = [next((s for h in HANDLERS.values() if (s := h.site(gm, node, config, calls)) is not None), None)
             for node in gm.graph.nodes]
    return _split(found, gm, config)


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
    """Every conv *module* of ``model`` (no graph: the module-swap path), split as ``find_convs`` splits a
    graph's convs. ``order``: conv names in the order they ran (an example-input run); convs not in it follow
    in registration order. Convs inside an instance of a type tracing keeps opaque (kdna_fx.registry.NOT_TRACED,
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
    """Input channels of the first convolution (in graph order for a GraphModule, else registration order):
    the default example input of kdna_fx.report."""
    if isinstance(model, fx.GraphModule):
        for node in (n for n in model.graph.nodes if is_conv_call(model, n)):
            if node.op == "call_module":
                return model.get_submodule(node.target).in_channels
            args = conv_arguments(node)
            if isinstance(args["weight"], fx.Node) and args["weight"].op == "get_attr":
                return model.get_parameter(args["weight"].target).shape[1] * int(args["groups"])
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
