"""What kdna_fx.transform leaves on the model it returns, read by fold, report, save and load.

Every transformed model carries one TransformRecord in the plain attribute ``RECORD_ATTR`` (not a parameter,
buffer or submodule: the state dict is unaffected). Two ways a child is put in place, one record:

- ``how == "graph"``: the model traced as a whole and is a GraphModule rewritten by passes.rewrite; its
  nodes carry tags (``node.meta["kdna"]``) that fold, calibrate and CKA read.
- ``how == "swap"``: the user's model object itself, each child conv module replaced in place by a bound
  ChildAdapter (passes.swap); its own Python forward, classes and attributes are untouched.

Either way ``plan`` names convs from the model's root.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from .errors import KDNAError

RECORD_ATTR = "_kdna_record"


@dataclass
class TransformRecord:
    plan: Any  # kdna_fx.passes.Plan, which carries the KDNAConfig it was made with
    params_before: int
    in_channels: int | None
    """Input channels of the first convolution: the default example input of report()."""
    folded: bool = False
    init: str = "copy"
    """How the adapters started: 'copy' (children are copies of their parent) or 'trained' (converted)."""
    how: str = "graph"
    """How the children were put in place: 'graph' (rewritten GraphModule) or 'swap' (module swap)."""
    opaque: tuple[Any, ...] = ()
    """kdna_fx.passes.route.Opaque: what kept the model off the graph path, or stayed an opaque leaf in it."""
    node_tags: tuple[tuple[int, dict[str, Any]], ...] = ()
    """(position in the graph, tag) of every tagged node: restores the tags when a pickled GraphModule is
    rebuilt from its code (torch.fx keeps no node metadata through pickle)."""

    @property
    def config(self) -> dict[str, Any]:
        """The plan's KDNAConfig as a plain dict."""
        return self.plan.config.to_dict()


def attach(model: nn.Module, record: TransformRecord) -> None:
    """Leave ``record`` on ``model``; on a GraphModule it also survives deepcopy (torch.fx's preserved
    attributes) and pickle (a plain attribute is restored; its node tags by ``store_tags``)."""
    object.__setattr__(model, RECORD_ATTR, record)
    if isinstance(model, fx.GraphModule):
        model.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[RECORD_ATTR] = record
        store_tags(model)


def store_tags(gm: fx.GraphModule) -> None:
    """Write the graph's node tags into its record (after every pass that changes the graph)."""
    record = find_record(gm)
    if record is not None:
        record.node_tags = tuple((i, dict(n.meta["kdna"])) for i, n in enumerate(gm.graph.nodes) if "kdna" in n.meta)


def restore_tags(graph: fx.Graph, record: TransformRecord) -> None:
    """Put the record's node tags back on a graph rebuilt from the same code (same nodes, same order)."""
    nodes = list(graph.nodes)
    for i, tag in record.node_tags:
        if i < len(nodes):
            nodes[i].meta["kdna"] = dict(tag)


def find_record(model: object) -> TransformRecord | None:
    """The record of a transformed model (or of the model inside a torch.compile wrapper), else None."""
    if not isinstance(model, nn.Module):
        return None
    # vars(): a plain attribute, never a parameter or submodule (nn.Module.__getattr__ would look there).
    record = vars(model).get(RECORD_ATTR)
    if record is not None and isinstance(model, fx.GraphModule):
        # A GraphModule rebuilt from pickle has the attribute but a fresh meta: keep deepcopy carrying it.
        model.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).setdefault(RECORD_ATTR, record)
    if record is None and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return find_record(model._orig_mod)
    return record


def record_of(model: nn.Module) -> TransformRecord:
    """The record of a transformed model (or of the model inside a torch.compile wrapper)."""
    record = find_record(model)
    if record is None:
        raise KDNAError(f"{type(model).__name__} is not a kdna_fx-transformed model; "
                        f"call kdna_fx.transform(model) first")
    return record


def graph_of(model: nn.Module) -> fx.GraphModule | None:
    """The rewritten graph of a transformed model (``how == "graph"``), else None (swapped, or not transformed)."""
    model = getattr(model, "_orig_mod", model)
    record = find_record(model)
    return model if record is not None and record.how == "graph" and isinstance(model, fx.GraphModule) else None


@contextmanager
def interpreted(gm: fx.GraphModule, interpreter: fx.Interpreter) -> Iterator[None]:
    """Within the block, every call of ``gm`` runs node by node through ``interpreter`` (to watch or stop at
    a node): ``gm.forward`` is shadowed on the instance, and restored on exit."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def forward(*args: Any, **kwargs: Any) -> Any:
        # Interpreter.run takes positional arguments only: bind keywords (and defaults) by placeholder.
        rest = [kwargs[n.target] if n.target in kwargs else n.args[0] for n in placeholders[len(args):]
                if n.target in kwargs or n.args]
        return interpreter.run(*args, *rest)

    vars(gm)["forward"] = forward
    try:
        yield
    finally:
        vars(gm).pop("forward", None)
