"""What kdna_fx.transform leaves on the model it returns, read by fold, report, save and load.

A GraphModule (the whole model traced) carries its record in ``gm.meta["kdna"]``, left there by
passes.rewrite. A *composite* (the model's own forward could not be traced; passes.partial) is the user's
model object with rewritten GraphModule subtrees installed in place: its record sits in the attribute
``COMPOSITE_ATTR``, speaks in names from the model's root, and lists the subtrees in ``parts``; each
subtree keeps its own record (names inside the subtree) as any GraphModule does.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from torch import fx, nn

from .errors import KDNAError

COMPOSITE_ATTR = "_kdna_record"


@dataclass
class TransformRecord:
    plan: Any  # kdna_fx.passes.Plan, which carries the KDNAConfig it was made with
    params_before: int
    in_channels: int | None
    """Input channels of the first convolution: the default example input of report()."""
    folded: bool = False
    init: str = "copy"
    """How the adapters started: 'copy' (children are copies of their parent) or 'trained' (converted)."""
    parts: tuple[str, ...] = ()
    """A composite's rewritten GraphModule subtrees, by module path; empty on a GraphModule."""
    opaque: tuple[Any, ...] = ()
    """kdna_fx.passes.partial.Opaque: each part that runs as it was (not traced, or left alone), and why."""

    @property
    def config(self) -> dict[str, Any]:
        """The plan's KDNAConfig as a plain dict."""
        return self.plan.config.to_dict()


def find_record(model: object) -> TransformRecord | None:
    """The record of a transformed model (or of the model inside a torch.compile wrapper), else None."""
    if not isinstance(model, nn.Module):
        return None
    meta = getattr(model, "meta", None)
    record = meta.get("kdna") if isinstance(meta, dict) else None
    # vars(): a plain attribute, never a parameter or submodule (nn.Module.__getattr__ would look there).
    record = record or vars(model).get(COMPOSITE_ATTR)
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


def graphs_of(model: nn.Module) -> list[fx.GraphModule]:
    """The rewritten graphs of a transformed model: the model itself, or a composite's parts."""
    record_of(model)  # refuses a model that was not transformed
    return [gm for _, gm in parts_of(model)]


def parts_of(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """(path from the model's root, graph) of each rewritten graph: ``[("", model)]`` for a model traced as a
    whole, a composite's parts otherwise, ``[]`` for a model kdna_fx did not transform. Names inside a
    part's graph (``node.meta["kdna"]["child"]``) are prefixed with its path to name the module from the root.
    """
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, fx.GraphModule) and "kdna" in model.meta:
        return [("", model)]
    record = find_record(model)
    return [] if record is None else [(path, model.get_submodule(path)) for path in record.parts]  # type: ignore[misc]


def rooted(path: str, name: str) -> str:
    """``name`` inside the part at ``path``, as seen from the model's root."""
    return f"{path}.{name}" if path and name else path or name


@contextmanager
def interpreted(gm: fx.GraphModule, interpreter: fx.Interpreter) -> Iterator[None]:
    """Within the block, every call of ``gm`` runs node by node through ``interpreter`` (to watch or stop at
    a node), also when it is called from a composite's own Python forward: ``gm.forward`` is shadowed on the
    instance, and restored on exit."""
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
