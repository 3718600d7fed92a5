"""KDNAConfig(policy="cka"): families chosen by measured output similarity (issue 9, part 3)."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import kdna_fx
from kdna_fx import KDNAConfig, passes
from kdna_fx.errors import ConfigError, KDNAError
from kdna_fx.testing import TinyResNet

pytestmark = pytest.mark.usefixtures("one_thread")


class Twins(nn.Module):
    """Four same-shaped 3x3 convs on one input; a and c hold the same kernel, and so do b and d.

    By position (max_children=1) the families are (a, b) and (c, d); by similarity they are (a, c), (b, d).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a, self.b, self.c, self.d = (nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(4))
        with torch.no_grad():
            self.c.weight.copy_(self.a.weight)
            self.d.weight.copy_(self.b.weight)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = self.a(x) + self.b(x).relu() + self.c(x) * 0.5 + self.d(x).relu() * 0.5
        return self.head(y.mean((2, 3)))


def images(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 1, 10, 10, generator=torch.Generator().manual_seed(0))


def test_members_with_identical_outputs_form_one_family():
    model = Twins().eval()
    config = KDNAConfig(stage_depth=0, max_children=1, only_if_smaller=False)
    by_position = kdna_fx.plan(model, config)
    assert [f.members for f in by_position.families if "stem" not in f.members] == [("a", "b"), ("c", "d")]
    by_cka = kdna_fx.plan(model, KDNAConfig(stage_depth=0, max_children=1, only_if_smaller=False, policy="cka"),
                          data=images())
    pairs = sorted(tuple(sorted(f.members)) for f in by_cka.families)
    assert pairs == [("a", "c"), ("b", "d")]
    for family in by_cka.families:
        assert family.similarity is not None and family.similarity[0] == pytest.approx(1.0, abs=1e-6)
    assert "CKA child-parent" in str(by_cka) and "1.00" in str(by_cka)
    # the same plan again (deterministic), and the family sizes are those of the position policy
    again = kdna_fx.plan(model, KDNAConfig(stage_depth=0, max_children=1, only_if_smaller=False, policy="cka"),
                         data=images())
    assert again.families == by_cka.families
    assert sorted(len(f.members) for f in by_cka.families) == sorted(len(f.members) for f in by_position.families)


def test_a_cka_plan_transforms_saves_and_reloads(tmp_path, dtype, tol):
    model = Twins().to(dtype).eval()
    config = KDNAConfig(stage_depth=0, max_children=1, only_if_smaller=False, policy="cka")
    kmodel = kdna_fx.transform(model, config, data=images().to(dtype)).eval()
    assert kdna_fx.plan_of(kmodel).families[0].similarity is not None
    assert "CKA child-parent" in str(kdna_fx.report(kmodel))
    x = images(4).to(dtype)
    path = tmp_path / "twins.safetensors"
    kdna_fx.save(kmodel, path)
    again = kdna_fx.load(path, Twins().to(dtype)).eval()
    torch.testing.assert_close(again(x), kmodel(x), **tol)
    assert kdna_fx.plan_of(again).families == kdna_fx.plan_of(kmodel).families


def _sites(model: nn.Module, config: KDNAConfig):
    return passes.find_modules(model, config)


@pytest.mark.parametrize("max_children", [None, 1, 2, 3])
def test_cka_groups_never_mix_shapes_and_keep_the_size_limits(max_children):
    model = TinyResNet(width=4)
    config = KDNAConfig(stage_depth=0, max_children=max_children)
    sites, skipped = _sites(model, config)
    generator = torch.Generator().manual_seed(1)
    names = [s.name for s in sites]
    table = {}
    for a, b in itertools.combinations(names, 2):
        table[a, b] = table[b, a] = float(torch.rand((), generator=generator))

    def similarity(a: str, b: str) -> float:
        return 1.0 if a == b else table[a, b]

    position = passes.plan_families(sites, skipped, config)
    cka = passes.plan_families(sites, skipped, KDNAConfig(stage_depth=0, max_children=max_children, policy="cka"),
                               similarity)
    by_name = {s.name: s for s in sites}
    for family in cka.families:
        assert len({by_name[m].family_key for m in family.members}) == 1
        if max_children is not None:
            assert len(family.children) <= max_children
        # the parent is the member most similar to the rest of its family
        means = {m: sum(similarity(m, o) for o in family.members if o != m) for m in family.members}
        assert means[family.parent] == max(means.values())
        assert family.similarity == tuple(similarity(family.parent, c) for c in family.children)
    assert sorted(len(f.members) for f in cka.families) == sorted(len(f.members) for f in position.families)
    shared = {m for f in cka.families for m in f.members}
    assert shared | {s.name for s in cka.skipped} >= set(names)  # every conv is shared or listed with a reason


def test_cka_policy_errors_name_the_fix():
    model = Twins()
    with pytest.raises(ConfigError, match="data=images"):
        kdna_fx.plan(model, KDNAConfig(policy="cka"))
    with pytest.raises(ConfigError, match="only used by KDNAConfig\\(policy='cka'\\)"):
        kdna_fx.plan(model, KDNAConfig(), data=images())
    with pytest.raises(ConfigError, match="policy"):
        KDNAConfig(policy="random")
    sites, skipped = _sites(model, KDNAConfig(policy="cka", stage_depth=0))
    with pytest.raises(KDNAError, match="similarities"):
        passes.plan_families(sites, skipped, KDNAConfig(policy="cka"))
    plan = kdna_fx.plan(model, KDNAConfig(stage_depth=0, only_if_smaller=False))
    with pytest.raises(ConfigError, match="both plan= and data="):
        kdna_fx.transform(model, plan=plan, data=images())


def test_plan_similarity_round_trips_and_follows_edits():
    family = kdna_fx.Family("a", ("b", "c"), similarity=(0.9, 0.5))
    plan = kdna_fx.Plan((family,))
    again = kdna_fx.Plan.from_dict(plan.to_dict())
    assert again.families == plan.families
    assert plan.without("b").families[0].similarity == (0.5,)
    with pytest.raises(KDNAError, match="one per child"):
        kdna_fx.Family("a", ("b", "c"), similarity=(0.9,))
    assert "similarity" not in kdna_fx.Plan((kdna_fx.Family("a", ("b",)),)).to_dict()["families"][0]


def test_policy_round_trips_through_the_config_dict():
    config = KDNAConfig(policy="cka", max_children=2)
    assert KDNAConfig.from_dict(config.to_dict()) == config
