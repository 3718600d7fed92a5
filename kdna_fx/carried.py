"""Attributes that travel with a model: the TransformRecord, the PeerRecord and the ModelSpec kdna_fx leaves
on what it builds (and the plain attributes a zoo model keeps for its training script).

``keep(model, name, value)`` sets one; ``kept(model, name)`` reads it; ``carry_over(source, target)`` gives a
model built from another (by kdna_fx.transform, say) every attribute kept on the other. On an nn.Module a plain
attribute already survives pickle, torch.save, copy.deepcopy and copy.copy. A torch.fx GraphModule keeps less
(torch/fx/graph_module.py):

- deepcopy rebuilds it from its graph: it keeps the attributes the graph reads, and ``meta``, whose
  ``_user_preserved_attributes`` it sets again as attributes;
- copy.copy rebuilds it too, sharing ``meta``, but sets no preserved attribute;
- pickle stores its ``__dict__`` without the graph and rebuilds it, as a GraphModule of torch's own class, by
  tracing its code: the plain attributes come back, ``meta`` comes back empty (so a deepcopy right after
  unpickling lost them).

So ``keep`` writes both: the plain attribute and meta's preserved attributes; and every GraphModule kdna_fx traces
(passes/tracing.py) is a ``KDNAGraphModule``, whose pickling restores ``meta`` and its own class (a second round
trip works too) and whose copy.copy sets the preserved attributes again. A GraphModule kdna_fx did not trace
(one a caller stamps, say) keeps torch's behaviour: pickle and deepcopy each carry the attribute, but a deepcopy
after a pickle round trip keeps it only if ``kept`` read it in between, and copy.copy drops it.
"""
from __future__ import annotations

from typing import Any, TypeVar

from torch import fx, nn
# Private names of torch.fx, pinned by pyproject (torch==2.14.1): the key under which GraphModule.__deepcopy__
# finds the attributes to set again, and (in _unpickle) the rebuilding steps of reduce_graph_module.
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY, _deserialize_graph_module, _forward_from_src


_NAMES = "_kdna_kept"
"""The kept attribute listing the names ``keep`` set on a model (what ``carry_over`` copies)."""
M = TypeVar("M")


def unwrapped(model: M) -> M:
    """The module inside a torch.compile wrapper (OptimizedModule), else ``model`` itself: the one place that
    reads ``_orig_mod``. vars(): the wrapper's own submodule, never a model's attribute of that name."""
    inner = vars(model).get("_modules", {}).get("_orig_mod") if isinstance(model, nn.Module) else None
    return inner if isinstance(inner, nn.Module) else model


def keep(model: nn.Module, name: str, value: Any) -> None:
    """Set the plain attribute ``name`` of ``model`` so that it travels with the model (see the module's doc)."""
    _set(model, name, value)
    names = vars(model).get(_NAMES, ())
    if name not in names:
        _set(model, _NAMES, (*names, name))


def _set(model: nn.Module, name: str, value: Any) -> None:
    object.__setattr__(model, name, value)
    if isinstance(model, fx.GraphModule):
        model.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[name] = value


def kept(model: nn.Module, name: str) -> Any:
    """The attribute ``keep`` set on ``model``, or on the module inside a torch.compile wrapper; else None.
    vars(): a plain attribute, never a parameter or submodule."""
    model = unwrapped(model)
    value = vars(model).get(name)
    if value is not None and isinstance(model, fx.GraphModule):
        # A GraphModule pickled as torch's own class (by a kdna_fx that had no KDNAGraphModule) comes back with
        # the attribute but an empty meta: keep a later deepcopy carrying it.
        model.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).setdefault(name, value)
    return value


def carry_over(source: nn.Module, target: nn.Module) -> None:
    """Keep on ``target`` (built from ``source``) every attribute kept on ``source`` that ``target`` does not
    hold itself: how the original was built, say, so that kdna_fx.load(path) can rebuild it."""
    for name in kept(source, _NAMES) or ():
        value = kept(source, name)
        if value is not None and vars(target).get(name) is None:
            keep(target, name, value)


def _set_preserved(gm: fx.GraphModule) -> fx.GraphModule:
    for name, value in gm.meta.get(_USER_PRESERVED_ATTRIBUTES_KEY, {}).items():
        object.__setattr__(gm, name, value)
    return gm


class KDNAGraphModule(fx.GraphModule):
    """A torch.fx GraphModule whose ``meta`` (and so what ``keep`` left on it) survives pickle and copy.copy, as
    it survives deepcopy. Everything else is torch's: deepcopy, tracing, torch.compile, torch.export."""

    def __reduce__(self) -> tuple[Any, ...]:
        # torch's: (reduce_graph_module, (the __dict__ without the graph, the code's import block)); the
        # __dict__ holds meta, which torch's rebuild drops.
        _, (body, import_block) = super().__reduce__()
        return (_unpickle, (body, import_block))

    def __copy__(self) -> KDNAGraphModule:
        # torch's __copy__ gives a GraphModule of its own class, with the same meta and no preserved attribute.
        copied = KDNAGraphModule(self, self.graph)
        copied.meta = self.meta
        return _set_preserved(copied)


def _unpickle(body: dict[str, Any], import_block: str) -> KDNAGraphModule:
    """torch.fx.graph_module.reduce_graph_module, rebuilding a KDNAGraphModule with its meta. torch's public
    reduce_graph_module always rebuilds a plain GraphModule; _deserialize_graph_module's ``graph_module_cls`` is
    torch's own way to rebuild a subclass (its pickle entry point: keep this function's name)."""
    meta = body["meta"]
    forward = _forward_from_src(import_block + body["_code"], {})
    gm = _deserialize_graph_module(forward, body, graph_module_cls=KDNAGraphModule)
    gm.meta = meta
    return _set_preserved(gm)
