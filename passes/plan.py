"""Pass 3: group eligible convolutions into families (one parent kernel, its children)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdna_fx._format import format_table
from kdna_fx.config import KDNAConfig

from .find import ConvSite, Skipped


@dataclass(frozen=True)
class Family:
    """Convs that share one kernel: ``parent`` keeps it, each child reuses it through an adapter.

    In adapter-only mode (``share=False``) a family is one conv that is its own parent and child.
    """

    stage: str
    parent: str
    children: tuple[str, ...]
    shape: tuple[int, int, int, int]  # parent kernel: (C_out, C_in / groups, kh, kw)
    groups: int

    @property
    def self_adapted(self) -> bool:
        return self.children == (self.parent,)


@dataclass(frozen=True)
class Plan:
    """What the rewrite will do: the families, and every conv left alone with the reason why."""

    families: tuple[Family, ...]
    skipped: tuple[Skipped, ...]
    sites: dict[str, ConvSite] = field(default_factory=dict, compare=False, repr=False)

    @property
    def children(self) -> list[str]:
        return [c for f in self.families for c in f.children]

    def parent_weight(self, family: Family) -> str:
        return self.sites[family.parent].weight

    def to_dict(self) -> dict[str, Any]:
        return {
            "families": [{"stage": f.stage, "parent": f.parent, "children": list(f.children),
                          "shape": list(f.shape), "groups": f.groups} for f in self.families],
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
        }

    def table(self) -> str:
        """The plan as readable text tables."""
        rows = [[f.stage or "-", f.parent, "(self)" if f.self_adapted else ", ".join(f.children),
                 "x".join(map(str, f.shape)), str(f.groups)] for f in self.families]
        text = format_table(["stage", "parent", "children", "kernel", "groups"], rows,
                            title=f"{len(self.families)} families, {len(self.children)} children")
        if self.skipped:
            text += "\n\n" + format_table(["conv", "why it is left alone"],
                                          [[s.name, s.reason] for s in self.skipped],
                                          title=f"{len(self.skipped)} convolutions skipped")
        return text

    def __str__(self) -> str:
        return self.table()


def plan_families(sites: list[ConvSite], skipped: list[Skipped], config: KDNAConfig) -> Plan:
    """Families by identical (stage, C_in, C_out, kernel, groups, dilation, padding mode), in graph order.

    The first member of a family is its parent; with ``max_children`` a family is split into runs of at
    most that many children, each run led by a parent of its own. Deterministic: same model, same plan.
    """
    by_name = {s.name: s for s in sites}
    skipped = list(skipped)
    if not config.share:
        families = [Family(s.stage, s.name, (s.name,), _shape(s), s.groups) for s in sites]
        return Plan(tuple(families), tuple(skipped), by_name)

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
        for start in range(0, len(members), step):
            run = members[start:start + step]
            if len(run) < 2:  # a lone trailing parent would share with nobody
                skipped.append(Skipped(run[0].name, f"left over after splitting by max_children={config.max_children}"))
                continue
            families.append(Family(run[0].stage, run[0].name, tuple(m.name for m in run[1:]), _shape(run[0]),
                                   run[0].groups))
    order = {s.name: i for i, s in enumerate(sites)}
    families.sort(key=lambda f: order[f.parent])
    return Plan(tuple(families), tuple(skipped), by_name)


def _shape(site: ConvSite) -> tuple[int, int, int, int]:
    return (site.out_channels, site.in_channels // site.groups, *site.kernel_size)


def _describe(site: ConvSite) -> str:
    kh, kw = site.kernel_size
    text = f"{site.in_channels}->{site.out_channels} {kh}x{kw}"
    return text + (f" groups={site.groups}" if site.groups > 1 else "")
