"""The FX passes of kdna_fx, one module per pass, composable as plain functions:

    unwrap -> trace -> find_convs -> plan_families (or adopt a given plan) -> check_plan -> rewrite
           -> (fold) -> (as_function)

``kdna_fx.transform`` runs the first six in that order, through ``trace_parts`` and ``assemble``
(passes/partial.py): a model torch.fx cannot trace as a whole is traced, planned and rewritten one
traceable subtree at a time, the rest kept opaque. ``rewrite`` leaves the record that ``fold``,
``as_function``, ``kdna_fx.report`` and ``kdna_fx.save`` read, so a pipeline built from the passes
directly works with all of them.

``swap_convs`` (passes/peers.py) is the dynamic-convolution peers' pass: after ``trace`` and with
``find_convs``' eligibility, it swaps conv modules for kdna_fx.peers layers.
"""
from .find import ConvSite, Skipped, find_convs
from .fold import fold
from .functionalize import FunctionalModel, as_function
from .initialize import initialize
from .partial import Opaque, Traced, assemble, merge_plans, split_plan, trace_parts, warn_opaque
from .peers import PeerRecord, swap_convs
from .plan import Family, Plan, adopt, plan_families
from .rewrite import check_plan, rewrite
from .trace import trace
from .unwrap import unwrap

__all__ = ["ConvSite", "Family", "FunctionalModel", "Opaque", "PeerRecord", "Plan", "Skipped", "Traced", "adopt",
           "as_function", "assemble", "check_plan", "find_convs", "fold", "initialize", "merge_plans", "plan_families",
           "rewrite", "split_plan", "swap_convs", "trace", "trace_parts", "unwrap", "warn_opaque"]
