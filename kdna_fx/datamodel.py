"""The one data model of kdna_fx: what the passes find, what they decide, and what they leave behind.

    ConvSite, Skipped      a conv that may be shared (found by a handler of passes/sites.py), or one left alone
    Family, Plan           what the transform will do: parents, children, skipped convs (with its KDNAConfig)
    TransformRecord        what a transformed model carries (``attach``, ``find_record``, ``record_of``)
    children               the one view of a transformed model's children: (path, ChildAdapter, parent module)
    PeerRecord             the same for a model converted by kdna_fx.peers (``peer_record``)

Every other module reads these types from here; the passes create them, the public face reads them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from torch import nn

from .adapters import ChildAdapter
from .carried import keep, kept, unwrapped
from .config import AdapterConfig, KDNAConfig
from .errors import KDNAError
from .functional import ntuple
from .tables import format_table


# ---- what the passes find ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvSite:
    """One conv module of the model that may take part in sharing."""

    name: str
    """Its module path from the model's root."""
    weight: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, ...]
    stride: Any
    padding: Any
    dilation: Any
    groups: int
    padding_mode: str
    has_bias: bool
    stage: str
    adapter: AdapterConfig | None
    """None when the config skips this conv; eligible sites always have one."""
    adapter_path: str
    """Where the child's ChildAdapter lives: in place of the conv module (its ``name``)."""
    frozen: bool = False
    """Its kernel does not train (``requires_grad=False``): it only shares with frozen convs, and as a child
    gets frozen adapters."""

    @property
    def family_key(self) -> tuple[Any, ...]:
        # Frozen and trainable convs never share: a shared kernel either trains or not, and a frozen part of
        # the model must stay as it was (transfer learning).
        return (self.stage, self.in_channels, self.out_channels, self.kernel_size, self.groups,
                ntuple(self.dilation, len(self.kernel_size)), self.padding_mode, self.frozen)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """(C_out, C_in / groups, *kernel_size): the shape of the kernel it holds or shares."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)


@dataclass(frozen=True)
class Skipped:
    """A convolution that is neither parent nor child, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Family:
    """Convs that share one kernel: ``parent`` keeps it, each child reuses it through an adapter.

    In adapter-only mode (``share=False``) a family is one conv that is its own parent and child.
    ``stage``, ``shape`` and ``groups`` describe the parent's conv; a hand-written family may leave them out,
    ``adopt`` fills them in from the model.
    """

    parent: str
    children: tuple[str, ...]
    stage: str = ""
    shape: tuple[int, ...] | None = None  # parent kernel: (C_out, C_in / groups, *kernel_size)
    groups: int = 1
    similarity: tuple[float, ...] | None = None
    """policy='cka': each child's measured CKA to the parent (in ``children`` order)."""
    frozen: bool = False
    """Its convs were frozen (``requires_grad=False``): the shared kernel and the children's adapters do not train."""

    def __post_init__(self) -> None:
        if isinstance(self.children, str):
            raise KDNAError(f"Family.children must be a sequence of conv names, got the string {self.children!r}")
        object.__setattr__(self, "children", tuple(self.children))
        if self.similarity is not None:
            object.__setattr__(self, "similarity", tuple(float(v) for v in self.similarity))
            if len(self.similarity) != len(self.children):
                raise KDNAError(f"the family of {self.parent!r} has {len(self.children)} children but "
                                f"{len(self.similarity)} similarities; give one per child or none")
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
        if not self.children:
            raise KDNAError(f"the family of {self.parent!r} has no children; a family needs at least one")

    @property
    def self_adapted(self) -> bool:
        return self.children == (self.parent,)

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.parent, *self.children)))


@dataclass(frozen=True)
class Plan:
    """What the rewrite will do: the families, and every conv left alone with the reason why.

    ``sites`` (the model's eligible convs by name) and ``config`` (the KDNAConfig that found them) are set
    once the plan belongs to a model: by ``plan_families`` or ``adopt``. Plans are immutable; edit one with
    ``without`` / ``with_family`` or through its dict form (``to_dict`` -> edit -> ``from_dict``).
    """

    families: tuple[Family, ...]
    skipped: tuple[Skipped, ...] = ()
    sites: dict[str, ConvSite] = field(default_factory=dict, compare=False, repr=False)
    config: KDNAConfig | None = field(default=None, compare=False, repr=False)

    @property
    def children(self) -> list[str]:
        return [c for f in self.families for c in f.children]

    def parent_weight(self, family: Family) -> str:
        return self.sites[family.parent].weight

    def family_of(self, name: str) -> Family | None:
        """The family ``name`` is a member of (parent or child), or None."""
        return next((f for f in self.families if name in f.members), None)

    # ---- editing ---------------------------------------------------------------------------------------
    def without(self, *names: str, reason: str = "removed from the plan (Plan.without)") -> "Plan":
        """This plan with ``names`` left alone: a child leaves its family; a parent takes its family with it
        (its children are left alone too). A family left without children is dropped."""
        unknown = [n for n in names if self.family_of(n) is None]
        if unknown:
            raise KDNAError(f"Plan.without: {unknown} are in no family of this plan; members are "
                            f"{sorted(m for f in self.families for m in f.members)[:8]}...")
        drop, families, skipped = set(names), [], list(self.skipped)
        for family in self.families:
            if family.parent in drop:
                skipped += [Skipped(m, reason if m in drop else f"its parent {family.parent!r} was {reason}")
                            for m in family.members]
                continue
            kept = [i for i, c in enumerate(family.children) if c not in drop]
            children = tuple(family.children[i] for i in kept)
            skipped += [Skipped(c, reason) for c in family.children if c in drop]
            if children:
                similarity = None if family.similarity is None else tuple(family.similarity[i] for i in kept)
                families.append(dataclasses.replace(family, children=children, similarity=similarity))
            else:
                skipped.append(Skipped(family.parent, "its family has no child left"))
        return dataclasses.replace(self, families=tuple(families), skipped=tuple(skipped))

    def with_family(self, parent: str, children: Iterable[str]) -> "Plan":
        """This plan plus a family: ``children`` reuse ``parent``'s kernel. The named convs leave the families
        they were in (a former parent's other children are left alone)."""
        family = Family(parent, tuple(children))
        named = set(family.members)
        current = [n for n in named if self.family_of(n) is not None]
        plan = self.without(*current, reason="moved to another family (Plan.with_family)") if current else self
        skipped = tuple(s for s in plan.skipped if s.name not in named)
        if parent in self.sites:
            site = self.sites[parent]
            family = dataclasses.replace(family, stage=site.stage, shape=site.kernel_shape, groups=site.groups)
        return dataclasses.replace(plan, families=(*plan.families, family), skipped=skipped)

    # ---- plain-dict form ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "families": [{"stage": f.stage, "parent": f.parent, "children": list(f.children),
                          "shape": list(f.shape) if f.shape is not None else None, "groups": f.groups,
                          **({"similarity": list(f.similarity)} if f.similarity is not None else {}),
                          **({"frozen": True} if f.frozen else {})}
                         for f in self.families],
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """A plan from ``to_dict``'s form; a family needs only ``parent`` and ``children``."""
        unknown = sorted(set(data) - {"families", "skipped"})
        if unknown or "families" not in data:
            raise KDNAError(f"a plan dict has the keys 'families' (required) and 'skipped'; got {sorted(data)}")
        families = []
        for i, entry in enumerate(data["families"]):
            extra = sorted(set(entry) - {"parent", "children", "stage", "shape", "groups", "similarity", "frozen"})
            if extra or "parent" not in entry or "children" not in entry:
                raise KDNAError(f"plan family #{i} {dict(entry)!r}: needs 'parent' and 'children' (optional: "
                                f"'stage', 'shape', 'groups', 'similarity', 'frozen')"
                                f"{f'; unknown keys {extra}' if extra else ''}")
            families.append(Family(**entry))
        skipped = tuple(Skipped(s["name"], s["reason"]) for s in data.get("skipped", ()))
        return cls(tuple(families), skipped)

    # ---- display -------------------------------------------------------------------------------------------
    def table(self) -> str:
        """The plan as readable text tables."""
        measured = any(f.similarity is not None for f in self.families)
        frozen = any(f.frozen for f in self.families)
        rows = [[f.stage or "-", f.parent, "(self)" if f.self_adapted else ", ".join(f.children),
                 "x".join(map(str, f.shape or ("?",))), str(f.groups)]
                + ([", ".join(f"{v:.2f}" for v in f.similarity or ()) or "-"] if measured else [])
                + (["yes" if f.frozen else "-"] if frozen else [])
                for f in self.families]
        text = format_table(["stage", "parent", "children", "kernel", "groups"]
                            + (["CKA child-parent"] if measured else []) + (["frozen"] if frozen else []), rows,
                            title=f"{len(self.families)} families, {len(self.children)} children")
        if self.skipped:
            text += "\n\n" + format_table(["conv", "why it is left alone"],
                                          [[s.name, s.reason] for s in self.skipped],
                                          title=f"{len(self.skipped)} convolutions skipped")
        return text

    def __str__(self) -> str:
        return self.table()


# ---- what a transformed or converted model carries ---------------------------------------------------------
RECORD_ATTR = "_kdna_record"


@dataclass
class TransformRecord:
    plan: Plan
    """The applied plan, which carries the KDNAConfig it was made with."""
    params_before: int
    in_channels: int | None
    """Input channels of the first convolution: the default example input of report()."""
    folded: bool = False
    init: str = "copy"
    """How the adapters started: 'copy' (children are copies of their parent) or 'trained' (converted)."""
    order: str = "registration"
    """What ordered the convs (the first of a family is its parent): "example inputs" (the order they ran in),
    "trace" (a torch.fx trace, only read) or "registration"."""
    checked: str = ""
    """For a graph form (passes.lower): what its trace was checked on ("example inputs", "inferred inputs ...")."""

    @property
    def config(self) -> dict[str, Any]:
        """The plan's KDNAConfig as a plain dict."""
        return self.plan.config.to_dict()


def attach(model: nn.Module, record: TransformRecord) -> None:
    """Leave ``record`` on ``model``, to travel with it (kdna_fx/carried.py)."""
    keep(model, RECORD_ATTR, record)


SOURCE_ATTR = "_kdna_module_form"


def module_form(model: nn.Module) -> nn.Module:
    """The transformed model whose module tree holds the children: ``model`` itself (inside a torch.compile
    wrapper: the wrapped model), or for a graph form (passes.lower) the model it was lowered from."""
    model = unwrapped(model)
    held = kept(model, SOURCE_ATTR)  # a 1-tuple: torch.fx sets a kept Module again as a submodule (state dict)
    return held[0] if held is not None else model


def children(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """(path, ChildAdapter, the module whose kernel it reads, None when it holds its own) of every child of the
    transformed ``model`` (its module form), in module order. The one view fold, calibrate, CKA and report read."""
    for path, module in module_form(model).named_modules():
        if isinstance(module, ChildAdapter):
            yield path, module, module.__dict__["_parent_module"]


def find_record(model: object) -> TransformRecord | None:
    """The record of a transformed model (or of the model inside a torch.compile wrapper), else None."""
    if not isinstance(model, nn.Module):
        return None
    return kept(model, RECORD_ATTR)


def record_of(model: nn.Module) -> TransformRecord:
    """The record of a transformed model (or of the model inside a torch.compile wrapper)."""
    record = find_record(model)
    if record is None:
        raise KDNAError(f"{type(model).__name__} is not a kdna_fx-transformed model; "
                        f"call kdna_fx.transform(model) first")
    return record


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


def attach_peer(model: nn.Module, record: PeerRecord) -> None:
    """Leave ``record`` on a model converted by a peer, to travel with it (kdna_fx/carried.py)."""
    keep(model, PEER_ATTR, record)


def peer_record(model: nn.Module) -> PeerRecord | None:
    """The PeerRecord of a converted model (or of the model inside a torch.compile wrapper), else None."""
    return kept(model, PEER_ATTR)


def converted_by(model: object) -> str | None:
    """What already converted ``model`` (or the model inside a torch.compile wrapper): "kdna_fx.transform",
    the kdna_fx.peers method, or None."""
    if not isinstance(model, nn.Module):
        return None
    if find_record(model) is not None:
        return "kdna_fx.transform"
    peer = peer_record(model)
    return f"kdna_fx.peers ({peer.method})" if peer is not None else None


def refuse_converted(model: object) -> None:
    """Raise a KDNAError if ``model`` was already converted: converting twice would share adapters' kernels."""
    done = converted_by(model)
    if done is not None:
        raise KDNAError(f"this model was already converted by {done}; convert the original model instead "
                        f"(kdna_fx.plan_of(model) gives a transformed model's plan, to replay on a fresh original)")
