"""Pass: replace eligible nn.Conv2d modules by dynamic-convolution peers (CondConv, DY-Conv, ODConv).

Eligibility is find_convs' (kernel_sizes, depthwise, include/exclude, by_name/by_type None entries, tied or
multiply-called convs) on a traced graph, find_modules' on a model that took the module swap (passes/route.py),
minus the KernelDNA-only adapter-cost rule (``only_if_smaller``). Each chosen conv module is swapped for
``make(conv)`` under the same path, so a graph itself does not change: its call_module node now calls the peer.
The pass leaves a PeerRecord (``peer_record``), which kdna_fx.peers.describe reads.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable

from torch import fx, nn

from kdna_fx.config import KDNAConfig
from kdna_fx.errors import KDNAError, NoEligibleConvWarning, SkippedSiteWarning
from kdna_fx.record import find_record

from .find import Skipped, find_convs, find_modules, first_in_channels


@dataclass
class PeerRecord:
    """What swap_convs did: the peer's name, the convs it replaced, those it left and why."""

    method: str
    params_before: int
    converted: tuple[str, ...]
    skipped: tuple[Skipped, ...]
    in_channels: int | None
    """Input channels of the model's first conv: the default example input of describe()."""


PEER_ATTR = "_kdna_peer"


def peer_record(model: nn.Module) -> PeerRecord | None:
    """The PeerRecord of a converted model: in a GraphModule's meta (kept by deepcopy), else a plain attribute."""
    if isinstance(model, fx.GraphModule) and "kdna_peer" in model.meta:
        return model.meta["kdna_peer"]
    return vars(model).get(PEER_ATTR)


def swap_convs(gm: nn.Module, config: KDNAConfig, make: Callable[[nn.Conv2d], nn.Module],
               method: str) -> nn.Module:
    """Replace, in place, every conv module that find_convs (on a GraphModule) or find_modules (on any other
    module) selects under ``config`` by ``make(conv)``."""
    if peer_record(gm) is not None or find_record(gm) is not None:
        raise KDNAError("this model was already converted by kdna_fx; convert the original model instead")
    params_before = sum(p.numel() for p in gm.parameters())
    in_channels = first_in_channels(gm)
    # The adapter-cost rule compares a KernelDNA adapter with a kernel; it means nothing for a peer.
    config = dataclasses.replace(config, only_if_smaller=False)
    if isinstance(gm, fx.GraphModule):
        sites, skipped = find_convs(gm, config)
    else:
        sites, skipped = find_modules(gm, config)
    converted = []
    for site in sites:
        if site.kind != "module":
            reason = "an F.conv2d call: the peers replace nn.Conv2d modules only"
            warnings.warn(f"kdna_fx left {site.name!r} as it was: {reason}", SkippedSiteWarning, stacklevel=3)
            skipped.append(Skipped(site.name, reason))
            continue
        owner_path, _, leaf = site.name.rpartition(".")
        conv = gm.get_submodule(site.name)
        setattr(gm.get_submodule(owner_path), leaf, make(conv).train(conv.training))  # new modules start in train mode
        converted.append(site.name)
    if not converted:
        warnings.warn(f"kdna_fx found no convolution to turn into {method} in the model; it is returned unchanged "
                      f"(traced). KDNAConfig(kernel_sizes=(1, 3), depthwise=True) widens the search.",
                      NoEligibleConvWarning, stacklevel=3)
    record = PeerRecord(method=method, params_before=params_before, converted=tuple(converted),
                        skipped=tuple(skipped), in_channels=in_channels)
    if isinstance(gm, fx.GraphModule):
        gm.recompile()
        gm.meta["kdna_peer"] = record
    else:
        object.__setattr__(gm, PEER_ATTR, record)
    return gm
