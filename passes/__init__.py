"""The FX passes of kdna_fx, one module per pass, composable as plain functions:

    unwrap -> route (trace, and check the trace) -> find_convs | find_modules -> plan_families (or adopt a
           given plan) -> check_plan -> rewrite | swap -> (fold) -> (as_function)

``kdna_fx.transform`` runs them in that order. ``route`` (passes/routing.py) decides how children are put in
place: ``rewrite`` turns a trusted whole-model trace into a GraphModule; ``swap`` replaces child conv
modules in place where the graph cannot be trusted. Both leave the record that ``fold``, ``as_function``,
``kdna_fx.report`` and ``kdna_fx.save`` read, so a pipeline built from the passes directly works with all
of them.

``swap_convs`` (passes/peers.py) is the dynamic-convolution peers' pass: on the same routed model and found
sites, it swaps conv modules for kdna_fx.peers layers. What differs between kinds of conv (an nn.Conv2d, an
F.conv2d call) lives in one handler per kind (passes/sites.py). The types the passes exchange (ConvSite,
Plan, TransformRecord, ...) live in kdna_fx.datamodel.
"""
from .find import find_convs, find_modules
from .folding import fold
from .functionalize import FunctionalModel, as_function
from .initialization import initialize
from .peers import swap_convs
from .plan import adopt, plan_families
from .rewriting import check_plan, rewrite
from .routing import Example, Route, route, warn_route
from .swapping import swap
from .tracing import trace
from .unwrapping import unwrap

__all__ = ["Example", "FunctionalModel", "Route", "adopt", "as_function", "check_plan", "find_convs", "find_modules",
           "fold", "initialize", "plan_families", "rewrite", "route", "swap", "swap_convs", "trace", "unwrap",
           "warn_route"]
