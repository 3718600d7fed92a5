"""The FX passes of kdna_fx, one module per pass, composable as plain functions:

    unwrap -> route (the convs' run order, read only) -> find_modules -> plan_families (or adopt a given
           plan) -> check_plan -> swap -> (fold) -> (lower) -> (as_function)

``kdna_fx.transform`` runs them in that order. ``swap`` puts every child in place in the model's own module
tree and leaves the record that ``fold``, ``lower``, ``as_function``, ``kdna_fx.report`` and ``kdna_fx.save``
read, so a pipeline built from the passes directly works with all of them. ``lower`` makes the graph form
(the design card's FX graph), checked against the model, when it is asked for.

``swap_convs`` (passes/peers.py) is the dynamic-convolution peers' pass: on the same found sites, it swaps
conv modules for kdna_fx.peers layers. The types the passes exchange (ConvSite, Plan, TransformRecord, ...)
live in kdna_fx.datamodel.
"""
from .find import find_modules
from .folding import fold
from .functionalize import FunctionalModel, as_function
from .initialization import initialize
from .lowering import lower
from .peers import swap_convs
from .plan import adopt, plan_families
from .routing import Example, Route, route
from .swapping import check_plan, swap
from .tracing import trace
from .unwrapping import unwrap

__all__ = ["Example", "FunctionalModel", "Route", "adopt", "as_function", "check_plan", "find_modules", "fold",
           "initialize", "lower", "plan_families", "route", "swap", "swap_convs", "trace", "unwrap"]
