"""Pass 1b: partial tracing, for models torch.fx cannot trace as a whole (KDNAConfig(untraceable="partial")).

Symbolic tracing cannot follow Python control flow on tensor values (detection models, RAFT, ...). Rather
than refuse such a model:

1. A submodule whose forward cannot be traced becomes an opaque leaf: that *instance* (not its class) is
   one call_module node of the graph, runs as it was, and its convolutions are not shared. Tracing is
   retried until it succeeds or the forward of the module being traced is what fails.
2. When the forward of the module being traced fails itself, each of its children that holds parameters
   is traced on its own, largest first (by parameter count), by the same two rules. The module keeps its
   own Python forward; each traced subtree with something to share is rewritten and installed in place
   of the child. Every subtree is planned exactly as ``transform(subtree)`` would plan it, so a family
   never crosses a trace boundary.

``trace_parts`` traces, ``assemble`` rewrites and installs (all or nothing per subtree) and leaves the
record, ``split_plan`` / ``merge_plans`` translate plans between the model's root and its parts. A model
that traces as a whole is one part at the path "" and comes back as a GraphModule, exactly as before.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import fx, nn

from kdna_fx.config import KDNAConfig
from kdna_fx.errors import KDNAError, KDNATraceError, PartialTraceWarning
from kdna_fx.record import COMPOSITE_ATTR, TransformRecord, record_of

from .find import Skipped
from .plan import Plan
from .rewrite import rewrite
from .trace import trace

KEPT = {
    "leaf": "an opaque call inside a traced graph; its convs are not shared",
    "forward": "its own forward runs as Python code; its children were traced on their own",
    "unchanged": "left exactly as it was, convs not shared",
}


@dataclass(frozen=True)
class Opaque:
    """A part of the model that runs as it was, and why."""

    path: str
    """Module path from the model's root; "" is the model's own forward."""
    type: str
    kept: str
    """How it was kept: one of KEPT's keys."""
    reason: str
    source: str = ""
    """Where tracing broke in the model's code ("file.py:12 `if x.sum() > 0:`"), when it did."""

    def describe(self) -> str:
        where = f" at {self.source}" if self.source else ""
        return f"'{self.path or '<model>'}' ({self.type}): {self.reason}{where}"


@dataclass
class Traced:
    """What tracing found: the traced parts by module path, and what stayed opaque."""

    parts: dict[str, fx.GraphModule] = field(default_factory=dict)
    opaque: list[Opaque] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        """The model traced as a whole (it may still hold opaque leaves)."""
        return "" in self.parts


def trace_parts(model: nn.Module, config: KDNAConfig) -> Traced:
    """Trace ``model`` as a whole if possible, else its traceable subtrees (see the module docstring).

    ``config.untraceable == "error"``: one plain ``trace``, which raises KDNATraceError on failure.
    """
    if config.untraceable == "error":
        return Traced({"": trace(model, config)})
    traced = Traced()
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    _trace_subtree(model, "", config, traced, uses)
    return traced


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _trace_subtree(module: nn.Module, path: str, config: KDNAConfig, traced: Traced, uses: Counter) -> None:
    inside = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    if any(uses[key] > count for key, count in inside.items()):
        # Rewritten on its own, a kernel tied to a module outside would be untied (or dropped) silently.
        traced.opaque.append(Opaque(path, type(module).__name__, "unchanged",
                                    "it shares parameters with modules outside it (tied weights)"))
        return
    leaves: dict[str, KDNATraceError] = {}
    while True:
        try:
            gm = trace(module, config, opaque=[module.get_submodule(name) for name in leaves])
            break
        except KDNATraceError as err:
            if err.module_name and err.module_name not in leaves:
                leaves[err.module_name] = err  # keep that instance opaque and trace again
                continue
            traced.opaque.append(_opaque(path, type(module).__name__, "forward", err))
            children = [(name, child) for name, child in module.named_children() if _size(child)]
            for name, child in sorted(children, key=lambda item: -_size(item[1])):
                _trace_subtree(child, _join(path, name), config, traced, uses)
            return
    traced.parts[path] = gm
    traced.opaque += [_opaque(_join(path, name), err.module_type, "leaf", err) for name, err in leaves.items()]


def _opaque(path: str, type_name: str, kept: str, err: KDNATraceError) -> Opaque:
    cause = f"{type(err.__cause__).__name__}: " if err.__cause__ is not None else ""
    first_sentence = err.operation.split(". ")[0]  # torch.fx's messages go on with general advice
    return Opaque(path, type_name, kept, cause + first_sentence, err.source)


# ---- plans: the model's root <-> its parts ---------------------------------------------------------------
def _local(name: str, path: str) -> str:
    """``name`` (from the model's root) as seen from inside the part at ``path``."""
    if name == path:
        return ""
    return name[len(path) + 1:] if path and name.startswith(path + ".") else name


def split_plan(plan: Plan, paths: Iterable[str]) -> dict[str, Plan]:
    """A plan of the whole model (names from its root) as one plan per traced part (names inside the part).

    Every family must lie inside one part: families never cross a trace boundary.
    """
    paths = list(paths)

    def home(name: str) -> str | None:
        return next((p for p in paths if not p or name.startswith(p + ".")), None)

    families: dict[str, list] = {p: [] for p in paths}
    skipped: dict[str, list] = {p: [] for p in paths}
    for family in plan.families:
        homes = {home(m) for m in family.members}
        if len(homes) != 1 or None in homes:
            shown = ", ".join(repr(p) for p in paths) or "none"
            raise KDNAError(f"the plan's family of {family.parent!r} ({', '.join(family.members)}) does not lie "
                            f"inside one traced part of this model (parts: {shown}); a family never crosses a "
                            f"trace boundary (docs/partial-tracing.md)")
        (p,) = homes
        families[p].append(dataclasses.replace(
            family, parent=_local(family.parent, p), children=tuple(_local(c, p) for c in family.children),
            stage=_local(family.stage, p)))
    for entry in plan.skipped:
        p = home(entry.name)
        if p is not None:
            skipped[p].append(Skipped(_local(entry.name, p), entry.reason))
    return {p: Plan(tuple(families[p]), tuple(skipped[p])) for p in paths}


def merge_plans(plans: dict[str, Plan], config: KDNAConfig) -> Plan:
    """The parts' plans as one plan of the whole model: every name is prefixed with its part's path.

    A site's ``node`` stays the node's name inside its part's graph.
    """
    families, skipped, sites = [], [], {}
    for path, plan in plans.items():
        families += [dataclasses.replace(f, parent=_join(path, f.parent), stage=_join(path, f.stage),
                                         children=tuple(_join(path, c) for c in f.children)) for f in plan.families]
        skipped += [Skipped(_join(path, s.name), s.reason) for s in plan.skipped]
        sites.update({_join(path, name): dataclasses.replace(site, name=_join(path, site.name), stage=_join(
            path, site.stage), weight=_join(path, site.weight)) for name, site in plan.sites.items()})
    return Plan(tuple(families), tuple(skipped), sites, config)


# ---- rewriting and installing -----------------------------------------------------------------------------
def assemble(model: nn.Module, traced: Traced, plans: dict[str, Plan], config: KDNAConfig,
             init: str = "copy") -> nn.Module:
    """Rewrite each traced part of ``model`` with its (checked) plan and return the transformed model.

    A model traced as a whole comes back as its rewritten GraphModule. Otherwise ``model`` itself comes back
    (changed in place), with each part that has families replaced by its rewritten GraphModule and a
    TransformRecord listing them. All or nothing per part: a part whose rewrite raises is left as it was
    (its shared kernels restored), listed as opaque with the error.
    """
    if traced.whole:
        gm = rewrite(traced.parts[""], plans[""], init=init)
        record_of(gm).opaque = tuple(traced.opaque)
        return gm
    params_before = sum(p.numel() for p in model.parameters())
    in_channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    plans, opaque, done = dict(plans), list(traced.opaque), {}
    for path, gm in traced.parts.items():
        plan = plans[path]
        if not plan.families:
            continue  # nothing to share: the subtree stays the module it was
        try:
            done[path] = _rewrite_or_restore(gm, plan, init)
        except Exception as exc:  # noqa: BLE001 - any failure leaves this part alone, the others go on
            reason = f"rewriting it failed: {type(exc).__name__}: {exc}"
            opaque.append(Opaque(path, type(model.get_submodule(path)).__name__, "unchanged", reason))
            left = tuple(Skipped(m, f"its part {path!r} was left as it was ({reason})")
                         for f in plan.families for m in f.members)
            plans[path] = dataclasses.replace(plan, families=(), skipped=plan.skipped + left)
    for path, gm in done.items():
        owner, _, name = path.rpartition(".")
        setattr(model.get_submodule(owner), name, gm)
    record = TransformRecord(merge_plans(plans, config), params_before, in_channels, init=init,
                             parts=tuple(done), opaque=tuple(opaque))
    object.__setattr__(model, COMPOSITE_ATTR, record)  # a plain attribute: not a parameter, not in the state dict
    return model


def _rewrite_or_restore(gm: fx.GraphModule, plan: Plan, init: str) -> fx.GraphModule:
    # rewrite only changes gm's own module tree, which nobody sees until it is installed; its last step
    # (initialize) writes the shared kernels, which are the model's own parameters: restore them on failure.
    shared = {id(p): p for p in (gm.get_parameter(plan.parent_weight(f)) for f in plan.families)}
    before = {key: p.detach().clone() for key, p in shared.items()}
    try:
        return rewrite(gm, plan, init=init)
    except BaseException:
        with torch.no_grad():
            for key, p in shared.items():
                p.copy_(before[key])
        raise


def warn_opaque(model: nn.Module, opaque: Iterable[Opaque], stacklevel: int) -> None:
    """One PartialTraceWarning naming every part that stayed opaque, with its reason and source line."""
    opaque = list(opaque)
    if not opaque:
        return
    shown = "; ".join(o.describe() + f" [{o.kept}]" for o in opaque[:4])
    more = f"; and {len(opaque) - 4} more" if len(opaque) > 4 else ""
    warnings.warn(f"kdna_fx kept {len(opaque)} part(s) of {type(model).__name__} as they were, their convolutions "
                  f"not shared: {shown}{more}. kdna_fx.report(model) lists them; KDNAConfig(untraceable='error') "
                  f"raises instead (docs/partial-tracing.md).", PartialTraceWarning, stacklevel=stacklevel + 1)
