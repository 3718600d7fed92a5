"""The FX passes of kdna_fx, one module per pass, composable as plain functions:

    unwrap -> trace -> find_convs -> plan_families -> check_plan -> rewrite -> (fold) -> (as_function)

``kdna_fx.transform`` runs the first six in that order.
"""
from .find import ConvSite, Skipped, find_convs
from .fold import fold
from .functionalize import FunctionalModel, as_function
from .plan import Family, Plan, plan_families
from .rewrite import check_plan, rewrite
from .trace import trace
from .unwrap import unwrap

__all__ = ["ConvSite", "Family", "FunctionalModel", "Plan", "Skipped", "as_function", "check_plan", "find_convs",
           "fold", "plan_families", "rewrite", "trace", "unwrap"]
