"""Conv sites: what kdna_fx can share (a conv module of any rank) and the functional conv calls it leaves alone.

    conv_module_site   an ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` module: the child's ChildAdapter replaces it at
                       its path (passes.swapping)
    functional_conv    an ``F.conv1d``/``F.conv2d``/``F.conv3d`` call in a trace (passes.routing reads one): skipped,
                       with why
    not_for_peers      why the dynamic-convolution peers cannot take a site (they are 2-D only)
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from kdna_fx.config import KDNAConfig
from kdna_fx.datamodel import ConvSite, Skipped

_FUNCTIONAL_CONVS = (F.conv1d, F.conv2d, F.conv3d)  # the very torch.conv1d/2d/3d objects
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
FUNCTIONAL = ("a functional conv call on a stored parameter: kdna_fx shares conv modules, whose children live in "
              "the model's own module tree; hold the kernel in an nn.Conv2d (nn.Conv1d, nn.Conv3d) to share it")


def functional_conv(gm: fx.GraphModule, node: fx.Node) -> Skipped | None:
    """The functional conv call ``node`` of a trace as a skipped conv (named by its stored weight where it has
    one), else None (not such a call)."""
    if not (node.op == "call_function" and node.target in _FUNCTIONAL_CONVS):
        return None
    weight = conv_arguments(node)["weight"]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return Skipped(f"{node.name} ({node.target.__name__})", "its weight is computed in the graph, not a stored "
                                                                 "parameter")
    return Skipped(weight.target, FUNCTIONAL)


def conv_module_site(name: str, module: nn.Module, config: KDNAConfig) -> ConvSite | Skipped | None:
    """The site of the conv module ``module`` at path ``name`` (None: not a conv)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return Skipped(name, f"{type(module).__name__}: transposed convolutions are not shared (only nn.Conv1d, "
                             f"nn.Conv2d and nn.Conv3d)")
    base = next((t for t in _CONV_MODULES if isinstance(module, t)), None)
    if base is None:
        return None
    if type(module).forward is not base.forward:
        return Skipped(name, f"{type(module).__name__} overrides {base.__name__}.forward; rewriting it would "
                             f"drop that logic")
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return Skipped(name, "lazy conv not yet initialised: run one forward pass before transform")
    if parametrize.is_parametrized(module, "weight") or not isinstance(module.weight, nn.Parameter):
        # weight_norm, spectral_norm, any torch.nn.utils.parametrize: the kernel is computed from other
        # tensors at every call, so there is no stored kernel to share or to replace.
        return Skipped(name, "its weight is computed at every call (weight_norm, spectral_norm or another "
                             "parametrization), not a stored kernel to share")
    return ConvSite(
        name=name, weight=f"{name}.weight",
        out_channels=module.out_channels, in_channels=module.in_channels, kernel_size=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
        dilation=tuple(module.dilation), groups=module.groups, padding_mode=module.padding_mode,
        has_bias=module.bias is not None, stage=config.stage_of(name),
        adapter=config.adapter_for(name, type(module)), adapter_path=name, frozen=not module.weight.requires_grad)


def not_for_peers(site: ConvSite) -> str | None:
    """Why the dynamic-convolution peers (which replace nn.Conv2d modules) cannot take ``site``, else None."""
    if len(site.kernel_size) != 2:
        return (f"a {len(site.kernel_size)}-D conv: the peers are 2-D only (their per-sample convolution's matmul "
                f"form, im2col by F.unfold, and their spatial attentions are written for a 2-D kernel)")
    return None


def conv_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of an F.conv1d/2d/3d call node by name, defaults filled in."""
    args = dict(_CONV_DEFAULTS)
    args.update(zip(_CONV_ARGS, node.args))
    args.update(node.kwargs)
    return args
