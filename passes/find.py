"""Pass 2: find the 2-D convolutions of a traced graph and decide which ones may be shared."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from kdna_fx.adapters import adapter_cost
from kdna_fx.config import AdapterConfig, KDNAConfig
from kdna_fx.registry import NOT_TRACED

_FUNCTIONAL_CONVS = (F.conv2d, torch.conv2d)
_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


@dataclass(frozen=True)
class ConvSite:
    """One convolution of the graph that may take part in sharing."""

    name: str
    """Module path for an nn.Conv2d; the weight's qualified name for an F.conv2d call."""
    kind: str  # "module" or "function"
    node: str
    weight: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    stride: Any
    padding: Any
    dilation: Any
    groups: int
    padding_mode: str
    has_bias: bool
    stage: str
    adapter: AdapterConfig | None
    """None when the config skips this conv; eligible sites always have one."""

    @property
    def family_key(self) -> tuple[Any, ...]:
        return (self.stage, self.in_channels, self.out_channels, self.kernel_size, self.groups,
                _pair(self.dilation), self.padding_mode)

    @property
    def adapter_path(self) -> str:
        """Where the child's adapter module lives: in place of the conv module, or beside the weight."""
        return self.name if self.kind == "module" else f"{self.name}_kdna"


@dataclass(frozen=True)
class Skipped:
    """A convolution that is neither parent nor child, and why."""

    name: str
    reason: str


def _pair(v: Any) -> Any:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v) if isinstance(v, int) else v


def find_convs(gm: fx.GraphModule, config: KDNAConfig) -> tuple[list[ConvSite], list[Skipped]]:
    """Every 2-D conv node in graph order, split into eligible sites and skipped ones (with a reason)."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    found = [_module_site(gm, node, config, calls) if node.op == "call_module" else _function_site(gm, node, config)
             for node in gm.graph.nodes
             if node.op == "call_module" or (node.op == "call_function" and node.target in _FUNCTIONAL_CONVS)]
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


def _module_site(gm: fx.GraphModule, node: fx.Node, config: KDNAConfig, calls: Counter) -> ConvSite | Skipped | None:
    site = conv_module_site(node.target, gm.get_submodule(node.target), config, node=node.name)
    if isinstance(site, ConvSite) and calls[node.target] > 1:
        return Skipped(node.target, f"module is called {calls[node.target]} times in the graph; a shared "
                                    f"module cannot become one child")
    return site


def conv_module_site(name: str, module: nn.Module, config: KDNAConfig, node: str = "") -> ConvSite | Skipped | None:
    """The site of the conv module ``module`` at path ``name`` (None: not a conv). ``node``: its graph node's
    name, "" when the child is put in place by module swap (passes.swap)."""
    if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)):
        return Skipped(name, f"{type(module).__name__}: only 2-D convolutions (nn.Conv2d) are shared")
    if not isinstance(module, nn.Conv2d):
        return None
    if type(module).forward is not nn.Conv2d.forward:
        return Skipped(name, f"{type(module).__name__} overrides nn.Conv2d.forward; rewriting it would "
                             f"drop that logic")
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return Skipped(name, "lazy conv not yet initialised: run one forward pass before transform")
    if parametrize.is_parametrized(module, "weight") or not isinstance(module.weight, nn.Parameter):
        # weight_norm, spectral_norm, any torch.nn.utils.parametrize: the kernel is computed from other
        # tensors at every call, so there is no stored kernel to share or to replace.
        return Skipped(name, "its weight is computed at every call (weight_norm, spectral_norm or another "
                             "parametrization), not a stored kernel to share")
    adapter = config.adapter_for(name, type(module))
    return ConvSite(
        name=name, kind="module", node=node, weight=f"{name}.weight",
        out_channels=module.out_channels, in_channels=module.in_channels, kernel_size=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
        dilation=tuple(module.dilation), groups=module.groups, padding_mode=module.padding_mode,
        has_bias=module.bias is not None, stage=config.stage_of(name),
        adapter=adapter)


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
        for node in model.graph.nodes:
            if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.modules.conv._ConvNd):
                return model.get_submodule(node.target).in_channels
            if node.op == "call_function" and node.target in _FUNCTIONAL_CONVS:
                args = conv2d_arguments(node)
                if isinstance(args["weight"], fx.Node) and args["weight"].op == "get_attr":
                    return model.get_parameter(args["weight"].target).shape[1] * int(args["groups"])
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def conv2d_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of an F.conv2d call node by name, defaults filled in."""
    args = dict(_CONV2D_DEFAULTS)
    args.update(zip(_CONV2D_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _function_site(gm: fx.GraphModule, node: fx.Node, config: KDNAConfig) -> ConvSite | Skipped:
    args = conv2d_arguments(node)
    weight = args["weight"]
    label = f"{node.name} (F.conv2d)"
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return Skipped(label, "its weight is computed in the graph, not a stored parameter")
    try:
        tensor = gm.get_parameter(weight.target)
    except AttributeError:
        return Skipped(label, f"its weight {weight.target!r} is a buffer or constant, not an nn.Parameter")
    if len(weight.users) > 1:
        return Skipped(weight.target, "its weight parameter is also read by other nodes of the graph")
    dynamic = [k for k in ("stride", "padding", "dilation", "groups") if isinstance(args[k], fx.Node)]
    if dynamic:
        return Skipped(weight.target, f"{', '.join(dynamic)} computed at run time")
    groups = int(args["groups"])
    adapter = config.adapter_for(weight.target, F.conv2d)
    padding = args["padding"] if isinstance(args["padding"], str) else _pair(args["padding"])
    return ConvSite(
        name=weight.target, kind="function", node=node.name, weight=weight.target,
        out_channels=tensor.shape[0], in_channels=tensor.shape[1] * groups, kernel_size=tuple(tensor.shape[2:]),
        stride=_pair(args["stride"]), padding=padding, dilation=_pair(args["dilation"]), groups=groups,
        padding_mode="zeros", has_bias=args["bias"] is not None, stage=config.stage_of(weight.target),
        adapter=adapter)


def owners(model: nn.Module) -> Counter:
    """How many distinct modules hold each parameter (by id). One module registered under several paths (an
    alias, as in MONAI's DynUNet) is one owner; a weight held by two modules is tied."""
    held = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            held.setdefault(id(p), set()).add(id(module))
    return Counter({key: len(mods) for key, mods in held.items()})


def _ineligible(site: ConvSite, gm: nn.Module, config: KDNAConfig, tied: Counter) -> str | None:
    kh, kw = site.kernel_size
    if kh != kw or kh not in config.kernel_sizes:
        return f"kernel {kh}x{kw} is not in kernel_sizes={config.kernel_sizes}"
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
