"""Pass: replace eligible nn.Conv2d modules by dynamic-convolution peers (CondConv, DY-Conv, ODConv).

Eligibility is find_convs' (kernel_sizes, depthwise, include/exclude, by_name/by_type None entries, tied or
multiply-called convs), minus the KernelDNA-only adapter-cost rule (``only_if_smaller``). Each chosen conv
module is swapped for ``make(conv)`` under the same path, so the graph itself does not change: its
call_module node now calls the peer. The pass leaves a PeerRecord in ``gm.meta["kdna_peer"]``, which
kdna_fx.peers.describe reads.
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

from .find import Skipped, find_convs, first_in_channels


@dataclass
class PeerRecord:
    """What swap_convs did: the peer's name, the convs it replaced, those it left and why."""

    method: str
    params_before: int
    converted: tuple[str, ...]
    skipped: tuple[Skipped, ...]
    in_channels: int | None
    """Input channels of the model's first conv: the default example input of describe()."""


def swap_convs(gm: fx.GraphModule, config: KDNAConfig, make: Callable[[nn.Conv2d], nn.Module],
               method: str) -> fx.GraphModule:
    """Replace, in place, every conv module that find_convs selects under ``config`` by ``make(conv)``."""
    if "kdna_peer" in gm.meta or find_record(gm) is not None:
        raise KDNAError("this GraphModule was already converted by kdna_fx; convert a fresh trace of the original")
    params_before = sum(p.numel() for p in gm.parameters())
    in_channels = first_in_channels(gm)
    # The adapter-cost rule compares a KernelDNA adapter with a kernel; it means nothing for a peer.
    sites, skipped = find_convs(gm, dataclasses.replace(config, only_if_smaller=False))
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
    gm.recompile()
    gm.meta["kdna_peer"] = PeerRecord(method=method, params_before=params_before, converted=tuple(converted),
                                      skipped=tuple(skipped), in_channels=in_channels)
    return gm
