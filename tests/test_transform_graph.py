"""The rewritten graph itself: one parent reference, children without kernels, re-traceable."""
from __future__ import annotations

import torch
import torchvision
from torch import fx

import kdna_fx
from kdna_fx import functional as KF
from kdna_fx.testing import TinyResNet, randomize_adapters


def test_resnet18_graph_structure():
    kmodel = kdna_fx.transform(torchvision.models.resnet18())
    kmodel.graph.lint()
    plan = kdna_fx.plan_of(kmodel)
    get_attrs = [n.target for n in kmodel.graph.nodes if n.op == "get_attr"]
    for family in plan.families:
        assert get_attrs.count(f"{family.parent}.weight") == 1  # the parent enters the graph once
        for child in family.children:
            adapter = kmodel.get_submodule(child)
            assert isinstance(adapter, kdna_fx.ChildAdapter) and adapter.parent == family.parent
            assert adapter.weight is None and f"{child}.weight" not in dict(kmodel.named_parameters())
    convs = [n for n in kmodel.graph.nodes if n.target is KF.conv2d]
    assert len(convs) == len(plan.children)
    # geometry kept: the stride-1 children keep stride 1 and padding 1
    assert all(n.kwargs["stride"] == (1, 1) and n.kwargs["padding"] == (1, 1) for n in convs)


def test_child_keeps_its_own_stride_padding_dilation_and_bias(dtype, tol):
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(4, 4, 3, stride=1, padding=1, bias=False)
            self.b = torch.nn.Conv2d(4, 4, 3, stride=2, padding=2, bias=True)

        def forward(self, x):
            return self.b(self.a(x))

    model = Mixed()
    with torch.no_grad():
        model.b.weight.copy_(model.a.weight)
    kmodel = kdna_fx.transform(model, kdna_fx.KDNAConfig(adapter=kdna_fx.AdapterConfig(gate=False)))
    child = kmodel.get_submodule("b")
    assert child.stride == (2, 2) and child.padding == (2, 2) and torch.equal(child.bias, model.b.bias)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(kmodel(x), model(x), **tol)


def test_transformed_model_can_be_traced_again(dtype, tol):
    kmodel = kdna_fx.transform(TinyResNet())
    randomize_adapters(kmodel)
    kmodel.eval()
    retraced = fx.symbolic_trace(kmodel)
    assert sum(n.target is KF.modulate for n in retraced.graph.nodes) == len(
        kdna_fx.plan_of(kmodel).children)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(retraced(x), kmodel(x), **tol)


def test_zoo_models_trace_with_adapters_as_leaf_calls(dtype, tol):
    from kdna_fx.models import create_model

    model = create_model("kdna_resnet18", num_classes=10, in_chans=1, small_stem=True, width=0.125).eval()
    traced = fx.symbolic_trace(model)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(traced(x), model(x), **tol)


def test_an_edited_plan_may_put_the_parent_after_its_children(dtype, tol):
    from kdna_fx.testing import ConvSpec, ConvStack

    model = ConvStack(4, [ConvSpec()] * 3)
    with torch.no_grad():
        for conv in model.convs:
            conv.weight.copy_(model.convs[0].weight)
    config = kdna_fx.KDNAConfig(adapter=kdna_fx.AdapterConfig(gate=False))
    plan = kdna_fx.plan(model, config)
    family = plan.families[0]
    edited = kdna_fx.passes.Plan((kdna_fx.passes.Family(family.stage, "convs.2", ("convs.0", "convs.1"),
                                                         family.shape, family.groups),), plan.skipped)
    kmodel = kdna_fx.transform(model, config, plan=edited)
    assert isinstance(kmodel.get_submodule("convs.0"), kdna_fx.ChildAdapter)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(kmodel(x), model(x), **tol)


def test_an_edited_plan_with_mismatched_shapes_or_unknown_names_is_refused():
    import pytest

    model = TinyResNet()
    plan = kdna_fx.plan(model)
    bad = kdna_fx.passes.Plan((kdna_fx.passes.Family("", "layer1.0.conv1", ("layer2.1.conv1",), (8, 8, 3, 3), 1),),
                              ())
    with pytest.raises(kdna_fx.KDNAError, match="kernel shapes differ"):
        kdna_fx.transform(model, plan=bad)
    ghost = kdna_fx.passes.Plan((kdna_fx.passes.Family("", "layer1.0.conv1", ("nowhere.conv",), (8, 8, 3, 3), 1),), ())
    with pytest.raises(kdna_fx.KDNAError, match="does not offer"):
        kdna_fx.transform(model, plan=ghost)
    assert plan.families  # the automatic plan itself is fine


def test_check_plan_leaves_unrecognised_sites_alone_with_a_warning():
    import dataclasses

    import pytest

    from kdna_fx import passes

    config = kdna_fx.KDNAConfig()
    gm = passes.trace(TinyResNet(), config)
    plan = passes.plan_families(*passes.find_convs(gm, config), config)
    child = plan.families[0].children[0]
    broken = passes.Plan(plan.families, plan.skipped,
                         {**plan.sites, child: dataclasses.replace(plan.sites[child], node="no_such_node")})
    with pytest.warns(kdna_fx.SkippedSiteWarning, match=child):
        checked = passes.check_plan(gm, broken)
    assert child not in checked.children and any(s.name == child for s in checked.skipped)
    passes.rewrite(gm, checked)  # the rest still rewrites into a valid graph
    gm.graph.lint()
