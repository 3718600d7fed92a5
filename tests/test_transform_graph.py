"""The transformed model and its graph form (passes.lower): one parent reference, children without kernels,
re-traceable."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import fx

import kdna_fx
from kdna_fx import functional as KF
from kdna_fx.testing import TinyResNet, randomize_adapters


def test_resnet18_graph_structure():
    kmodel = kdna_fx.transform(torchvision.models.resnet18(), kdna_fx.KDNAConfig(rewrite="graph"))
    assert isinstance(kmodel, fx.GraphModule)
    assert kdna_fx.datamodel.record_of(kmodel).checked == "inferred inputs (2, 3, 64, 64)"
    kmodel.graph.lint()
    plan = kdna_fx.plan_of(kmodel)
    get_attrs = [n.target for n in kmodel.graph.nodes if n.op == "get_attr"]
    for family in plan.families:
        assert get_attrs.count(f"{family.parent}.weight") == 1  # the parent enters the graph once
        for child in family.children:
            adapter = kmodel.get_submodule(child)
            assert isinstance(adapter, kdna_fx.adapters.ChildAdapter) and adapter.parent == family.parent
            assert adapter.held_weight is None and f"{child}.weight" not in dict(kmodel.named_parameters())
    convs = [n for n in kmodel.graph.nodes if n.target is KF.child_conv]
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


def test_a_plain_trace_of_an_unfolded_model_is_refused_naming_the_fixes_and_the_folded_one_traces(dtype, tol):
    """A plain torch.fx trace would read each parent's kernel by path, and graph passes (BatchNorm fusion,
    torch.ao prepare) rewrite that kernel under the children: refused, naming fold and passes.lower."""
    kmodel = kdna_fx.transform(TinyResNet())
    randomize_adapters(kmodel)
    kmodel.eval()
    with pytest.raises(kdna_fx.ParentKernelError, match=r"kdna_fx.fold\(model\).*kdna_fx.passes.lower"):
        fx.symbolic_trace(kmodel)
    x = torch.randn(2, 3, 16, 16)
    lowered = kdna_fx.passes.lower(kmodel, (x,))
    assert sum(n.target is KF.child_conv for n in lowered.graph.nodes) == len(kdna_fx.plan_of(kmodel).children)
    torch.testing.assert_close(lowered(x), kmodel(x), **tol)
    folded = kdna_fx.fold(kmodel)
    torch.testing.assert_close(fx.symbolic_trace(folded)(x), kmodel(x), **tol)


def test_zoo_models_trace_once_folded(dtype, tol):
    from kdna_fx.models import create_model

    model = create_model("kdna_resnet18", num_classes=10, in_chans=1, small_stem=True, width=0.125).eval()
    traced = fx.symbolic_trace(kdna_fx.fold(model))
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(traced(x), model(x), **tol)


def test_an_edited_plan_may_put_the_parent_after_its_children(dtype, tol):
    from kdna_fx.testing import ConvSpec, ConvStack

    model = ConvStack(4, [ConvSpec()] * 3)
    with torch.no_grad():
        for conv in model.convs:
            conv.weight.copy_(model.convs[0].weight)
    config = kdna_fx.KDNAConfig(adapter=kdna_fx.AdapterConfig(gate=False))
    edited = kdna_fx.plan(model, config).with_family("convs.2", ["convs.0", "convs.1"])
    assert [(f.parent, f.children) for f in edited.families] == [("convs.2", ("convs.0", "convs.1"))]
    kmodel = kdna_fx.transform(model, config, plan=edited)
    assert isinstance(kmodel.get_submodule("convs.0"), kdna_fx.adapters.ChildAdapter)
    assert isinstance(kmodel.get_submodule("convs.2"), torch.nn.Conv2d)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(kmodel(x), model(x), **tol)


def test_an_edited_plan_with_mismatched_shapes_or_unknown_names_is_refused():
    model = TinyResNet()
    bad = kdna_fx.Plan.from_dict({"families": [{"parent": "layer1.0.conv1", "children": ["layer2.1.conv1"]}]})
    with pytest.raises(kdna_fx.KDNAError, match=r"kernels differ \(out_channels 16 vs 8, in_channels 16 vs 8"):
        kdna_fx.transform(model, plan=bad)
    ghost = kdna_fx.Plan.from_dict({"families": [{"parent": "layer1.0.conv1", "children": ["nowhere.conv"]}]})
    with pytest.raises(kdna_fx.KDNAError, match="'nowhere.conv': no such conv"):
        kdna_fx.transform(model, plan=ghost)
    down = kdna_fx.Plan.from_dict({"families": [{"parent": "layer2.0.conv2", "children": ["layer2.0.down.0"]}]})
    with pytest.raises(kdna_fx.KDNAError, match=r"'layer2.0.down.0': kernel 1x1 is not in kernel_sizes"):
        kdna_fx.transform(model, plan=down)


def test_a_conv_that_is_both_parent_and_child_is_refused():
    plan = kdna_fx.Plan.from_dict({"families": [
        {"parent": "layer1.0.conv1", "children": ["layer1.0.conv2"]},
        {"parent": "layer1.0.conv2", "children": ["layer1.1.conv1"]}]})
    with pytest.raises(kdna_fx.KDNAError, match=r"\['layer1.0.conv2'\] would be both a parent and a child"):
        kdna_fx.transform(TinyResNet(), plan=plan)
    twice = kdna_fx.Plan.from_dict({"families": [
        {"parent": "layer1.0.conv1", "children": ["layer1.0.conv2"]},
        {"parent": "layer1.1.conv1", "children": ["layer1.0.conv2"]}]})
    with pytest.raises(kdna_fx.KDNAError, match="more than one family"):
        kdna_fx.transform(TinyResNet(), plan=twice)


def test_plan_dict_round_trip_and_bad_dicts():
    plan = kdna_fx.plan(TinyResNet())
    again = kdna_fx.Plan.from_dict(plan.to_dict())
    assert again == plan and again.to_dict() == plan.to_dict()
    with pytest.raises(kdna_fx.KDNAError, match="'families'"):
        kdna_fx.Plan.from_dict({"familes": []})
    with pytest.raises(kdna_fx.KDNAError, match="needs 'parent' and 'children'"):
        kdna_fx.Plan.from_dict({"families": [{"parent": "a", "child": ["b"]}]})
    with pytest.raises(kdna_fx.KDNAError, match="sequence of conv names"):
        kdna_fx.Plan.from_dict({"families": [{"parent": "a", "children": "b"}]})


def test_plan_editing():
    plan = kdna_fx.plan(TinyResNet())
    first = plan.families[0]
    smaller = plan.without(first.children[0])
    assert first.children[0] not in smaller.children
    assert any(s.name == first.children[0] and "Plan.without" in s.reason for s in smaller.skipped)
    gone = plan.without(first.parent)
    assert not set(first.members) & set(gone.children) and first.parent not in [f.parent for f in gone.families]
    with pytest.raises(kdna_fx.KDNAError, match="in no family"):
        plan.without("stem.0")
    moved = plan.with_family(first.children[-1], [first.parent])
    assert moved.family_of(first.parent).parent == first.children[-1]
    assert moved.family_of(first.parent).shape == first.shape  # filled in from the model's sites


def test_a_model_built_from_an_edited_plan_saves_and_reloads(tmp_path, dtype, tol):
    model = TinyResNet()
    plan = kdna_fx.plan(model)
    edited = plan.without(plan.families[0].children[0])
    kmodel = kdna_fx.transform(model, plan=edited)
    randomize_adapters(kmodel)
    kdna_fx.save(kmodel, tmp_path / "m.safetensors")
    loaded = kdna_fx.load(tmp_path / "m.safetensors", TinyResNet())
    assert kdna_fx.plan_of(loaded).to_dict() == kdna_fx.plan_of(kmodel).to_dict()
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(loaded.eval()(x), kmodel.eval()(x), **tol)


def test_the_passes_compose_without_transform(dtype, tol):
    """swap leaves the record, so fold, lower, as_function, report and save work on a hand-run pipeline."""
    from kdna_fx import passes

    model = TinyResNet().eval()
    config = kdna_fx.KDNAConfig()
    plan = passes.check_plan(passes.plan_families(*passes.find_modules(model, config), config))
    kmodel = passes.swap(model, plan)
    randomize_adapters(kmodel)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(passes.fold(kmodel)(x), kmodel(x), **tol)
    gm = passes.lower(kmodel, (x,))
    torch.testing.assert_close(gm(x), kmodel(x), **tol)
    torch.testing.assert_close(passes.fold(gm)(x), kmodel(x), **tol)
    fn = passes.as_function(gm)
    torch.testing.assert_close(fn(fn.parents, fn.params, fn.buffers, x), gm(x), **tol)
    assert kdna_fx.report(gm, x).params_before == kdna_fx.report(kmodel, x).params_before
    with pytest.raises(kdna_fx.KDNAError, match="already converted by kdna_fx.transform"):
        passes.swap(kmodel, plan)


def test_a_lowering_that_differs_from_the_model_is_refused():
    """A Python check that is False for an fx Proxy drops a branch from the trace: lower says so, never a
    different graph (with example inputs, and with the inputs it infers)."""
    class Guarded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.b(self.a(x))
            return y + 1 if isinstance(x, torch.Tensor) else y

    config = kdna_fx.KDNAConfig(only_if_smaller=False)
    kmodel = kdna_fx.transform(Guarded(), config)
    assert isinstance(kmodel, Guarded)
    for inputs in ((torch.randn(2, 8, 8, 8),), None):
        with pytest.raises(kdna_fx.KDNAError, match="cannot lower Guarded to a graph: output differs"):
            kdna_fx.passes.lower(kmodel, inputs)
    with pytest.raises(kdna_fx.KDNAError, match="cannot lower Guarded"):
        kdna_fx.transform(Guarded(), kdna_fx.KDNAConfig(only_if_smaller=False, rewrite="graph"))


@pytest.mark.parametrize("method", ["transform", "condconv", "odconv"])
def test_new_modules_take_the_mode_of_the_model(method):
    """A model transformed in eval mode infers in eval mode: its gates normalise with their running statistics
    and never update them, without the user calling .eval() again (and train mode likewise stays train mode)."""
    convert = {"transform": kdna_fx.transform, "condconv": kdna_fx.peers.condconv,
               "odconv": kdna_fx.peers.odconv}[method]
    for training in (False, True):
        kmodel = convert(TinyResNet().train(training))
        assert kmodel.training is training
        assert {m.training for m in kmodel.modules()} == {training}
    kmodel = convert(TinyResNet().eval())
    before = {k: v.clone() for k, v in kmodel.state_dict().items()}
    with torch.no_grad():
        one, batch = kmodel(torch.randn(1, 3, 12, 12)), kmodel(torch.randn(4, 3, 12, 12))
    assert one.shape[0] == 1 and batch.shape[0] == 4  # batch 1 is fine in eval, whatever the gate's norm
    for key, value in kmodel.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed during eval-mode inference"
