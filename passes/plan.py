"""Pass 3: group eligible convolutions into families (one parent kernel, its children).

A Plan is the one description of what the rewrite does. It comes from ``plan_families`` (automatic), from
``Plan.from_dict`` (a saved or hand-written plan, as the model zoo's reference topologies are), or from
editing one (``without``, ``with_family``); ``adopt`` checks a given plan against a model's convs.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from kdna_fx.config import KDNAConfig
from kdna_fx.errors import KDNAError
from kdna_fx.tables import format_table

from .find import ConvSite, Skipped


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
    shape: tuple[int, int, int, int] | None = None  # parent kernel: (C_out, C_in / groups, kh, kw)
    groups: int = 1
    similarity: tuple[float, ...] | None = None
    """policy='cka': each child's measured CKA to the parent (in ``children`` order)."""

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
            family = dataclasses.replace(family, stage=site.stage, shape=_shape(site), groups=site.groups)
        return dataclasses.replace(plan, families=(*plan.families, family), skipped=skipped)

    # ---- plain-dict form ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "families": [{"stage": f.stage, "parent": f.parent, "children": list(f.children),
                          "shape": list(f.shape) if f.shape is not None else None, "groups": f.groups,
                          **({"similarity": list(f.similarity)} if f.similarity is not None else {})}
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
            extra = sorted(set(entry) - {"parent", "children", "stage", "shape", "groups", "similarity"})
            if extra or "parent" not in entry or "children" not in entry:
                raise KDNAError(f"plan family #{i} {dict(entry)!r}: needs 'parent' and 'children' (optional: "
                                f"'stage', 'shape', 'groups', 'similarity'){f'; unknown keys {extra}' if extra else ''}")
            families.append(Family(**entry))
        skipped = tuple(Skipped(s["name"], s["reason"]) for s in data.get("skipped", ()))
        return cls(tuple(families), skipped)

    # ---- display -------------------------------------------------------------------------------------------
    def table(self) -> str:
        """The plan as readable text tables."""
        measured = any(f.similarity is not None for f in self.families)
        rows = [[f.stage or "-", f.parent, "(self)" if f.self_adapted else ", ".join(f.children),
                 "x".join(map(str, f.shape or ("?",))), str(f.groups)]
                + ([", ".join(f"{v:.2f}" for v in f.similarity or ()) or "-"] if measured else [])
                for f in self.families]
        text = format_table(["stage", "parent", "children", "kernel", "groups"]
                            + (["CKA child-parent"] if measured else []), rows,
                            title=f"{len(self.families)} families, {len(self.children)} children")
        if self.skipped:
            text += "\n\n" + format_table(["conv", "why it is left alone"],
                                          [[s.name, s.reason] for s in self.skipped],
                                          title=f"{len(self.skipped)} convolutions skipped")
        return text

    def __str__(self) -> str:
        return self.table()


Similarity = Callable[[str, str], float]


def plan_families(sites: list[ConvSite], skipped: list[Skipped], config: KDNAConfig,
                  similarity: Similarity | None = None) -> Plan:
    """Families by identical (stage, C_in, C_out, kernel, groups, dilation, padding mode).

    ``config.policy == "position"``: in graph order, the first member of a family is its parent; with
    ``max_children`` a family is split into runs of at most that many children, each led by a parent of
    its own. ``"cka"``: ``similarity(a, b)`` (the CKA of two convs' outputs, measured by the caller) groups
    the members into families of the same sizes, most similar together, and makes the member with the
    highest mean similarity to the rest of its family the parent. Deterministic: same inputs, same plan.
    """
    if config.policy == "cka" and similarity is None:
        raise KDNAError("KDNAConfig(policy='cka') needs the convs' measured similarities: give calibration "
                        "images, kdna_fx.plan(model, config, data=images) or transform(model, config, data=images)")
    by_name = {s.name: s for s in sites}
    skipped = list(skipped)
    if not config.share:
        families = [_family(s, (s,)) for s in sites]
        return Plan(tuple(families), tuple(skipped), by_name, config)

    groups: dict[tuple[Any, ...], list[ConvSite]] = {}
    for site in sites:
        groups.setdefault(site.family_key, []).append(site)
    families: list[Family] = []
    for members in groups.values():
        if len(members) < config.min_family_size:
            first = members[0]
            for m in members:
                skipped.append(Skipped(m.name, (
                    f"no family: {len(members)} conv(s) of shape {_describe(first)} in stage "
                    f"'{first.stage or '<model>'}', min_family_size={config.min_family_size}")))
            continue
        step = (config.max_children or len(members)) + 1
        runs = [members[start:start + step] for start in range(0, len(members), step)]
        if config.policy == "cka":
            runs = _similar_groups(members, [len(r) for r in runs], similarity)  # type: ignore[arg-type]
        for run in runs:
            if len(run) < 2:  # a lone trailing parent would share with nobody
                skipped.append(Skipped(run[0].name, f"left over after splitting by max_children={config.max_children}"))
                continue
            if config.policy == "cka":
                families.append(_representative_family(run, similarity))  # type: ignore[arg-type]
            else:
                families.append(_family(run[0], run[1:]))
    order = {s.name: i for i, s in enumerate(sites)}
    families.sort(key=lambda f: order[f.parent])
    return Plan(tuple(families), tuple(skipped), by_name, config)


def adopt(plan: Plan, sites: list[ConvSite], skipped: list[Skipped], config: KDNAConfig) -> Plan:
    """``plan`` (hand-written, edited or saved) checked against a model's convs and completed from them.

    Every named conv must be eligible; a conv is in one family at most, and never both a parent and a
    child. Stage, kernel shape and groups are taken from the model. Convs the plan does not mention are
    listed as skipped with their reason.
    """
    by_name = {s.name: s for s in sites}
    why = {s.name: s.reason for s in skipped}
    named = [m for f in plan.families for m in f.members]
    missing = [n for n in dict.fromkeys(named) if n not in by_name]
    if missing:
        details = "; ".join(f"{n!r}: {why[n]}" if n in why else f"{n!r}: no such conv in the model"
                            for n in missing[:5])
        raise KDNAError(f"the plan names convs this model does not offer for sharing ({details}). Build the "
                        f"plan on the same architecture (kdna_fx.plan(model, config)), or change the config so "
                        f"these convs are eligible (e.g. kernel_sizes, depthwise, only_if_smaller=False).")
    repeated = sorted(n for n, count in Counter(named).items() if count > 1)
    parents = {f.parent for f in plan.families if not f.self_adapted}
    both = sorted(parents & {c for f in plan.families if not f.self_adapted for c in f.children})
    if both:
        raise KDNAError(f"{both} would be both a parent and a child; a child reuses its parent's kernel and has "
                        f"none to lend. Make the child's parent the parent of the whole family instead.")
    if repeated:
        raise KDNAError(f"{repeated} appear in more than one family (or twice in one); a conv belongs to one "
                        f"family at most")
    families = tuple(dataclasses.replace(_family(by_name[f.parent], [by_name[c] for c in f.children]),
                                         similarity=f.similarity) for f in plan.families)
    in_family = set(named)
    kept = [s for s in plan.skipped if s.name not in in_family]
    listed = {s.name for s in kept}
    rest = [s for s in skipped if s.name not in listed and s.name not in in_family]
    rest += [Skipped(s.name, "not in the given plan") for s in sites
             if s.name not in in_family and s.name not in listed]
    return Plan(families, tuple(kept + rest), by_name, config)


def _similar_groups(members: list[ConvSite], sizes: list[int], similarity: Similarity) -> list[list[ConvSite]]:
    """Split ``members`` into groups of ``sizes``: each group is seeded by the member most similar to the
    others left, then filled with the members most similar to that seed. Ties go to graph order."""
    left = list(members)
    groups = []
    for size in sizes:
        def mean_to_rest(m: ConvSite) -> float:
            return sum(similarity(m.name, o.name) for o in left if o is not m) / max(1, len(left) - 1)

        seed = max(left, key=lambda m: (mean_to_rest(m), -left.index(m)))
        rest = sorted((m for m in left if m is not seed), key=lambda m: (-similarity(seed.name, m.name), left.index(m)))
        group = [seed] + rest[:size - 1]
        left = [m for m in left if m not in group]
        groups.append([m for m in members if m in group])  # graph order inside a family
    return groups


def _representative_family(run: list[ConvSite], similarity: Similarity) -> Family:
    """The member with the highest mean similarity to the others is the parent (ties: graph order)."""
    def mean(m: ConvSite) -> float:
        return sum(similarity(m.name, o.name) for o in run if o is not m) / (len(run) - 1)

    parent = max(run, key=lambda m: (mean(m), -run.index(m)))
    children = [m for m in run if m is not parent]
    return dataclasses.replace(_family(parent, children),
                               similarity=tuple(similarity(parent.name, c.name) for c in children))


def _family(parent: ConvSite, children: Iterable[ConvSite]) -> Family:
    return Family(parent.name, tuple(c.name for c in children), parent.stage, _shape(parent), parent.groups)


def _shape(site: ConvSite) -> tuple[int, int, int, int]:
    return (site.out_channels, site.in_channels // site.groups, *site.kernel_size)


def _describe(site: ConvSite) -> str:
    kh, kw = site.kernel_size
    text = f"{site.in_channels}->{site.out_channels} {kh}x{kw}"
    # Every part of the family key that differs from the default: convs alike but for their dilation
    # (DeepLabV3's ASPP) would otherwise read as the same shape, yet sit in families of their own.
    text += f" groups={site.groups}" if site.groups > 1 else ""
    text += f" dilation={tuple(site.dilation)}" if tuple(site.dilation) != (1, 1) else ""
    return text + (f" padding_mode={site.padding_mode}" if site.padding_mode != "zeros" else "")
