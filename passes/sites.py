"""Conv-site handlers: one object per kind of convolution the passes share, in Torch-Pruning's manner.

A handler knows everything that differs between kinds of conv: how its call looks in a graph (``site``),
what of such a call the rewrite cannot take (``unsupported``), what the child conv reads from the graph
(``graph_inputs``), where the parent kernel comes from for the children (``parent_weight``), and what is
left to clean up (``finish``). passes.find, passes.rewriting and passes.peers ask ``handler_of(site)`` and never
branch on the kind themselves; a new kind of conv (say, a registered custom conv type) is a new handler.

    ModuleConv    an ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` module call: the child's adapter replaces the module
    FunctionConv  an ``F.conv2d(x, self.weight, ...)`` call (or conv1d, conv3d) on a stored parameter: the adapter
                  sits beside it
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from kdna_fx.config import KDNAConfig
from kdna_fx.datamodel import ConvSite, Skipped, tag
from kdna_fx.functional import ntuple

_FUNCTIONAL_CONVS = (F.conv1d, F.conv2d, F.conv3d)  # the very torch.conv1d/2d/3d objects
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


@dataclass
class GraphInputs:
    """What a child conv reads in the graph, taken from the conv call it replaces."""

    x: fx.Node
    bias: nn.Parameter | None
    """A bias the ChildAdapter takes over (a module's); None when the bias stays a graph value (``bias_arg``)."""
    bias_arg: Any
    training: bool
    own_weight: fx.Node | None
    """The call's own kernel node (F.conv2d), reused as the parent reference; None for a module."""


class ConvHandler:
    """The interface every handler implements (see the module docstring)."""

    kind: str

    def site(self, gm: fx.GraphModule, node: fx.Node, config: KDNAConfig, calls: Counter) -> ConvSite | Skipped | None:
        """The site of ``node`` when it is this handler's kind of conv call, else None."""
        raise NotImplementedError

    def unsupported(self, node: fx.Node) -> str | None:
        """Why the rewrite cannot replace this call exactly, else None."""
        raise NotImplementedError

    def graph_inputs(self, gm: fx.GraphModule, node: fx.Node) -> GraphInputs:
        raise NotImplementedError

    def parent_weight(self, gm: fx.GraphModule, inputs: GraphInputs, site: ConvSite,
                      before: fx.Node, order: dict[fx.Node, int]) -> fx.Node:
        """A node reading the kernel of parent ``site``, placed before ``before`` (``order``: node positions)."""
        raise NotImplementedError

    keeps_kernel: bool
    """Whether a conv of this kind that keeps its kernel (adapter-only mode, a centroid's first member) holds
    it in its ChildAdapter; a function conv's kernel stays where the model stored it."""

    def finish(self, gm: fx.GraphModule, site: ConvSite, inputs: GraphInputs, keeps_kernel: bool) -> None:
        """Clean up after the child replaced the call."""

    def not_for_peers(self, site: ConvSite) -> str | None:
        """Why the dynamic-convolution peers (which replace nn.Conv2d modules) cannot take this site, else None."""
        if len(site.kernel_size) != 2:
            return (f"a {len(site.kernel_size)}-D conv: the peers are 2-D only (their per-sample convolution's matmul "
                    f"form, im2col by F.unfold, and their spatial attentions are written for a 2-D kernel)")
        return None


class ModuleConv(ConvHandler):
    kind = "module"
    keeps_kernel = True

    def site(self, gm: fx.GraphModule, node: fx.Node, config: KDNAConfig, calls: Counter) -> ConvSite | Skipped | None:
        if node.op != "call_module":
            return None
        found = conv_module_site(node.target, gm.get_submodule(node.target), config, node=node.name)
        if isinstance(found, ConvSite) and calls[node.target] > 1:
            return Skipped(node.target, f"module is called {calls[node.target]} times in the graph; a shared "
                                        f"module cannot become one child")
        return found

    def unsupported(self, node: fx.Node) -> str | None:
        return "the conv module is called with more than one argument" if len(node.args) + len(node.kwargs) != 1 else None

    def graph_inputs(self, gm: fx.GraphModule, node: fx.Node) -> GraphInputs:
        conv = gm.get_submodule(node.target)
        x = node.args[0] if node.args else node.kwargs["input"]
        return GraphInputs(x=x, bias=conv.bias, bias_arg=None, training=conv.training, own_weight=None)

    def parent_weight(self, gm: fx.GraphModule, inputs: GraphInputs, site: ConvSite,
                      before: fx.Node, order: dict[fx.Node, int]) -> fx.Node:
        with gm.graph.inserting_before(before):
            return tag(gm.graph.get_attr(site.weight), "parent_weight", site.name)


class FunctionConv(ConvHandler):
    kind = "function"
    keeps_kernel = False

    def site(self, gm: fx.GraphModule, node: fx.Node, config: KDNAConfig, calls: Counter) -> ConvSite | Skipped | None:
        if not (node.op == "call_function" and node.target in _FUNCTIONAL_CONVS):
            return None
        args = conv_arguments(node)
        weight = args["weight"]
        label = f"{node.name} ({node.target.__name__})"
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
        groups, n = int(args["groups"]), tensor.dim() - 2
        padding = args["padding"] if isinstance(args["padding"], str) else ntuple(args["padding"], n)
        return ConvSite(
            name=weight.target, kind=self.kind, node=node.name, weight=weight.target,
            out_channels=tensor.shape[0], in_channels=tensor.shape[1] * groups, kernel_size=tuple(tensor.shape[2:]),
            stride=ntuple(args["stride"], n), padding=padding, dilation=ntuple(args["dilation"], n), groups=groups,
            padding_mode="zeros", has_bias=args["bias"] is not None, stage=config.stage_of(weight.target),
            adapter=config.adapter_for(weight.target, node.target), adapter_path=f"{weight.target}_kdna")

    def unsupported(self, node: fx.Node) -> str | None:
        if not isinstance(conv_arguments(node)["input"], fx.Node):
            return "the functional conv's input is a constant, not a graph value"
        return None

    def graph_inputs(self, gm: fx.GraphModule, node: fx.Node) -> GraphInputs:
        args = conv_arguments(node)
        return GraphInputs(x=args["input"], bias=None, bias_arg=args["bias"], training=gm.training,
                           own_weight=args["weight"])

    def parent_weight(self, gm: fx.GraphModule, inputs: GraphInputs, site: ConvSite,
                      before: fx.Node, order: dict[fx.Node, int]) -> fx.Node:
        weight = inputs.own_weight  # the call's own get_attr, reused by every child
        assert weight is not None
        if order.get(weight, -1) > order.get(before, -1):
            before.prepend(weight)
        return weight

    def finish(self, gm: fx.GraphModule, site: ConvSite, inputs: GraphInputs, keeps_kernel: bool) -> None:
        if keeps_kernel:
            return
        gm.graph.erase_node(inputs.own_weight)  # the child reads its parent's kernel: its own goes
        owner_path, _, field = site.weight.rpartition(".")
        delattr(gm.get_submodule(owner_path), field)

    def not_for_peers(self, site: ConvSite) -> str | None:
        return "a functional conv call: the peers replace nn.Conv2d modules only"


HANDLERS: dict[str, ConvHandler] = {h.kind: h for h in (ModuleConv(), FunctionConv())}


def handler_of(site: ConvSite) -> ConvHandler:
    """The handler of ``site``'s kind."""
    return HANDLERS[site.kind]


def conv_module_site(name: str, module: nn.Module, config: KDNAConfig, node: str = "") -> ConvSite | Skipped | None:
    """The site of the conv module ``module`` at path ``name`` (None: not a conv). ``node``: its graph node's
    name, "" when the child is put in place by module swap (passes.swapping)."""
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
        name=name, kind=ModuleConv.kind, node=node, weight=f"{name}.weight",
        out_channels=module.out_channels, in_channels=module.in_channels, kernel_size=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
        dilation=tuple(module.dilation), groups=module.groups, padding_mode=module.padding_mode,
        has_bias=module.bias is not None, stage=config.stage_of(name),
        adapter=config.adapter_for(name, type(module)), adapter_path=name)


def conv_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of an F.conv1d/2d/3d call node by name, defaults filled in."""
    args = dict(_CONV_DEFAULTS)
    args.update(zip(_CONV_ARGS, node.args))
    args.update(node.kwargs)
    return args


def is_conv_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` calls a conv module (any dimension) or a functional conv."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.modules.conv._ConvNd)
    return node.op == "call_function" and node.target in _FUNCTIONAL_CONVS
