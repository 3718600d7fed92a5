"""Pass 3: group eligible convolutions into families (one parent kernel, its children).

A Plan (kdna_fx.datamodel) is the one description of what the rewrite does. It comes from ``plan_families`` (automatic), from
``Plan.from_dict`` (a saved or hand-written plan, as the model zoo's reference topologies are), or from
editing one (``without``, ``with_family``); ``adopt`` checks a given plan against a model's convs.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable, Iterable

from kdna_fx.config import KDNAConfig
from kdna_fx.datamodel import ConvSite, Family, Plan, Skipped
from kdna_fx.errors import KDNAError


Similarity = Callable[[str, str], float]


def plan_families(sites: list[ConvSite], skipped: list[Skipped], config: KDNAConfig,
                  similarity: Similarity | None = None) -> Plan:
    """Families by identical (stage, C_in, C_out, kernel, groups, dilation, padding mode, frozen or not).

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
    mixed = [f.parent for f in plan.families if len({by_name[m].frozen for m in f.members}) > 1]
    if mixed:
        raise KDNAError(f"the families of {mixed[:3]} mix frozen convs (weight.requires_grad=False) with trainable "
                        f"ones; a shared kernel either trains or not. Freeze all of a family's convs or none "
                        f"before transform, or take the frozen ones out of the plan (Plan.without).")
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
    return Family(parent.name, tuple(c.name for c in children), parent.stage, parent.kernel_shape, parent.groups,
                  frozen=parent.frozen)


def _describe(site: ConvSite) -> str:
    text = f"{site.in_channels}->{site.out_channels} {'x'.join(map(str, site.kernel_size))}"
    # Every part of the family key that differs from the default: convs alike but for their dilation
    # (DeepLabV3's ASPP) would otherwise read as the same shape, yet sit in families of their own.
    text += f" groups={site.groups}" if site.groups > 1 else ""
    text += f" dilation={tuple(site.dilation)}" if any(d != 1 for d in site.dilation) else ""
    text += f" padding_mode={site.padding_mode}" if site.padding_mode != "zeros" else ""
    return text + (" frozen" if site.frozen else "")
