"""Models torch.fx cannot trace as a whole: like every model, they keep their own forward and objects, still share
their convs, and everything downstream (report, plan_of, fold, save/load, as_function, load_original, CKA plans)
works on the result; only their graph form (rewrite="graph") is an error pointing at the user's line."""
from __future__ import annotations

import copy
import inspect
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import kdna_fx
from kdna_fx import KDNAConfig
from kdna_fx.passes import routing as route_pass, tracing as trace_pass
from kdna_fx.datamodel import record_of
from kdna_fx.reporting import count_macs
from kdna_fx.testing import TinyResNet, randomize_adapters

# The warning is checked where it is the subject (pytest.warns records it regardless of this filter).
pytestmark = [pytest.mark.usefixtures("one_thread")]


def _line_of(function: object, needle: str) -> str:
    """'test_partial_trace.py:N' for the line of ``function`` that contains ``needle``."""
    lines, first = inspect.getsourcelines(function)
    offset = next(i for i, line in enumerate(lines) if needle in line)
    return f"{os.path.basename(__file__)}:{first + offset}"


class GuardedNet(nn.Module):
    """Data-dependent control flow in the model's own forward, above a traceable ResNet-like body."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyResNet(width=4, num_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.sum() > 0:  # data-dependent: torch.fx cannot follow it
            return y
        return -y


class Branchy(nn.Module):
    """Two convs, one chosen by the data when ``check`` is set (then it cannot be traced)."""

    def __init__(self, channels: int, check: bool) -> None:
        super().__init__()
        self.check = check
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check and x.mean() > 0:  # data-dependent only when check is set
            return self.conv1(x)
        return self.conv2(torch.tanh(self.conv1(x)))


class MixedNet(nn.Module):
    """Traceable convs around one untraceable instance of a class whose other instance traces."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.blocks = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.Tanh(), Branchy(6, check=True),
                                    Branchy(6, check=False), nn.Conv2d(6, 6, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def _expected_with_parent_kernels(model: nn.Module, kmodel: nn.Module) -> nn.Module:
    """The original model with every child's kernel replaced by its parent's: what a transform with
    init='trained' computes (identity gates, zero F and S) when no residual is configured."""
    expected = copy.deepcopy(model)
    plan = kdna_fx.plan_of(kmodel)
    with torch.no_grad():
        for family in plan.families:
            parent = expected.get_submodule(family.parent).weight
            for child in family.children:
                expected.get_submodule(child).weight.copy_(parent)
    return expected


# ---- (a) the model's own forward cannot be traced ----------------------------------------------------------------
def test_untraceable_top_level_is_shared_by_module_swap(dtype, tol):
    torch.manual_seed(0)
    net = GuardedNet()
    kmodel = kdna_fx.transform(net)
    assert type(kmodel) is GuardedNet and type(kmodel.body) is TinyResNet  # the user's objects stay
    assert record_of(kmodel).order == "registration"  # no trace to read the order from
    assert isinstance(net.body.layer1[0].conv2, nn.Conv2d)  # the caller's model is untouched

    # The same families as the body transformed on its own (its stages differ in shape), from the root.
    alone = kdna_fx.plan(net.body)
    assert [(f.parent, f.children) for f in kdna_fx.plan_of(kmodel).families] == [
        (f"body.{f.parent}", tuple(f"body.{c}" for c in f.children)) for f in alone.families]
    assert len(alone.families) == 2

    # Same seed, same adapters, same state: the swapped model computes what the body's graph rewrite does.
    torch.manual_seed(1)
    kmodel = kdna_fx.transform(net)
    torch.manual_seed(1)
    kbody = kdna_fx.transform(net.body)
    assert kbody.state_dict().keys() == kmodel.body.state_dict().keys()
    randomize_adapters(kbody)
    kmodel.body.load_state_dict(kbody.state_dict())
    reference = copy.deepcopy(net)
    reference.body = kbody
    x = torch.randn(2, 3, 8, 8)
    kmodel.eval(), reference.eval()
    torch.testing.assert_close(kmodel(x), reference(x), **tol)

    # Copy-init oracle, independent of the passes: identity gates, each child computing with its parent's kernel.
    trained = kdna_fx.transform(net, init="trained").eval()
    torch.testing.assert_close(trained(x), _expected_with_parent_kernels(net, trained).eval()(x), **tol)

    report = kdna_fx.report(kmodel, x[:1])
    assert report.order == "registration" and "convs ordered by: registration" in str(report)
    assert report.macs_before == count_macs(net, x[:1])[0]
    assert report.params_after < report.params_before == sum(p.numel() for p in net.parameters())


@pytest.mark.integration  # a dynamo capture with graph breaks, about 5 s
def test_swapped_model_compiles_and_matches_eager():
    """torch.compile of a swapped model: the model's own Python forward (a data-dependent branch, so graph breaks
    and guards) around its child convs, gates and shared kernels equals eager. aot_eager: dynamo's capture and
    AOT autograd are what the branch exercises; Inductor's code for a transformed model is tested in
    test_functional_nd."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    kmodel = kdna_fx.transform(GuardedNet())
    randomize_adapters(kmodel, generator=torch.Generator().manual_seed(0))
    kmodel.eval()
    x = torch.randn(3, 3, 8, 8)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        expected = kmodel(x)
        compiled = torch.compile(kmodel, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled(-x), kmodel(-x), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1  # something was compiled, not all run eagerly


def test_inplace_returns_the_users_own_object():
    net = GuardedNet()
    kmodel = kdna_fx.transform(net, inplace=True)
    assert kmodel is net and isinstance(net.body.layer1[0].conv2, kdna_fx.adapters.ChildAdapter)
    with pytest.raises(kdna_fx.KDNAError, match="already converted by kdna_fx.transform"):
        kdna_fx.transform(net)


# ---- (b) one submodule instance cannot be traced ---------------------------------------------------------------
def test_the_convs_of_an_untraceable_submodule_are_shared(dtype, tol):
    torch.manual_seed(0)
    net = MixedNet()
    kmodel = kdna_fx.transform(net, init="trained")
    assert type(kmodel) is MixedNet and type(kmodel.blocks[2]) is Branchy
    plan = kdna_fx.plan_of(kmodel)
    # The convs inside the untraceable instance are shared too: a child needs no trace.
    assert [(f.parent, f.children) for f in plan.families] == [
        ("blocks.0", ("blocks.2.conv1", "blocks.2.conv2", "blocks.3.conv1", "blocks.3.conv2", "blocks.4"))]
    kmodel.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(kmodel(x), _expected_with_parent_kernels(net, kmodel).eval()(x), **tol)


# ---- (c) rewrite="graph": the graph or an error pointing at the user's line ------------------------------
def test_graph_mode_points_at_the_users_line():
    with pytest.raises(kdna_fx.KDNATraceError) as info:
        kdna_fx.transform(GuardedNet(), KDNAConfig(rewrite="graph"))
    line = _line_of(GuardedNet.forward, "if y.sum() > 0")
    message = str(info.value)
    assert line in message and line in info.value.source and "if y.sum() > 0:" in message
    assert info.value.module_name == "" and "passes" + os.sep + "trace.py" not in message

    with pytest.raises(kdna_fx.KDNATraceError) as info:
        kdna_fx.transform(MixedNet(), KDNAConfig(rewrite="graph"))
    assert (info.value.module_name, info.value.module_type) == ("blocks.2", "Branchy")
    assert _line_of(Branchy.forward, "if self.check") in str(info.value)


def test_kdna_fx_and_torch_frames_are_never_the_models_code():
    for own in (trace_pass.__file__, route_pass.__file__, kdna_fx.api.__file__, torch.fx.proxy.__file__):
        assert not trace_pass._is_model_code(own)
    assert trace_pass._is_model_code(__file__)
    assert trace_pass._is_model_code(inspect.getfile(kdna_fx.models))  # the zoo is model code like any other
    # No frame of the model's code at all: the first line of the module's forward.
    source = trace_pass._source(RuntimeError("raised by torch before the model ran"), GuardedNet())
    assert _line_of(GuardedNet.forward, "def forward") in source


def test_rewrite_option_is_validated_and_round_trips():
    with pytest.raises(kdna_fx.ConfigError, match="rewrite"):
        KDNAConfig(rewrite="partial")
    config = KDNAConfig(rewrite="swap")
    assert KDNAConfig.from_dict(config.to_dict()) == config and config.to_dict()["rewrite"] == "swap"
    assert KDNAConfig().rewrite == "auto"
    # files saved before the option existed still load
    assert KDNAConfig.from_dict({"untraceable": "error"}).rewrite == "graph"
    assert KDNAConfig.from_dict({"untraceable": "partial"}).rewrite == "auto"


# ---- (d) save/load, fold and plans on a swapped model -------------------------------------------------------
def test_swapped_save_load_strict_and_fold(tmp_path, dtype, tol):
    torch.manual_seed(0)
    kmodel = kdna_fx.transform(GuardedNet())
    randomize_adapters(kmodel)
    kmodel(torch.randn(4, 3, 8, 8))  # move BN statistics away from their initial values
    kmodel.eval()
    x = torch.randn(2, 3, 8, 8)

    fresh = kdna_fx.transform(GuardedNet())
    fresh.load_state_dict(kmodel.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(x), kmodel(x), **tol)

    kdna_fx.save(kmodel, tmp_path / "guarded.safetensors")
    loaded = kdna_fx.load(tmp_path / "guarded.safetensors", GuardedNet())  # the saved plan is replayed on it
    assert type(loaded) is GuardedNet and kdna_fx.plan_of(loaded) == kdna_fx.plan_of(kmodel)
    assert loaded.state_dict().keys() == kmodel.state_dict().keys()
    torch.testing.assert_close(loaded.eval()(x), kmodel(x), **tol)
    again = kdna_fx.load(tmp_path / "guarded.safetensors", fresh)  # an already transformed model
    assert again is fresh

    folded = kdna_fx.fold(kmodel)
    assert record_of(folded).folded and not record_of(kmodel).folded
    assert folded.body.layer1[0].conv2.folded_weight is not None
    torch.testing.assert_close(folded(x), kmodel(x), **tol)
    with pytest.raises(kdna_fx.StateError, match="unfolded"):
        kdna_fx.save(folded, tmp_path / "folded.safetensors")

    # A plan taken from the swapped model goes back in.
    plan = kdna_fx.plan(GuardedNet())
    assert kdna_fx.plan_of(kdna_fx.transform(GuardedNet(), plan=plan)) == plan


def test_root_names_serve_as_function_load_original_and_cka_plans(dtype, tol):
    torch.manual_seed(0)
    net = GuardedNet()
    kmodel = kdna_fx.transform(net).eval()
    x = torch.randn(2, 3, 8, 8)
    fn = kdna_fx.as_function(kmodel)
    plan = kdna_fx.plan_of(kmodel)
    assert set(fn.parents) == {plan.parent_weight(f) for f in plan.families} == {
        "body.layer1.0.conv1.weight", "body.layer2.0.conv2.weight"}
    torch.testing.assert_close(fn(fn.parents, fn.params, fn.buffers, x), kmodel(x), **tol)
    # the parent kernels are inputs of the function: a different kernel changes the output
    doubled = {n: 2 * p for n, p in fn.parents.items()}
    assert not torch.allclose(fn(doubled, fn.params, fn.buffers, x), kmodel(x))

    reloaded = kdna_fx.load_original(kdna_fx.transform(GuardedNet()), net.state_dict()).eval()
    torch.testing.assert_close(reloaded.body.get_parameter("layer1.0.conv1.weight"),
                               net.body.layer1[0].conv1.weight, rtol=0, atol=0)

    # policy="cka": similarities measured once on the whole (untraceable) model, by names from its root.
    cka = kdna_fx.plan(net, KDNAConfig(policy="cka"), data=torch.randn(8, 3, 8, 8))
    assert {f.stage for f in cka.families} == {"body"}
    assert all(f.similarity is not None for f in cka.families)


def test_families_are_planned_over_the_whole_model():
    """The issue's case: one data-dependent `if` at the top must not change what is shared below it."""
    class Body(nn.Module):
        def __init__(self, guarded: bool) -> None:
            super().__init__()
            self.guarded = guarded
            self.body = nn.Sequential(*(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(4)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.guarded and x.sum() > 1e9:
                x = x * 0
            return self.body(x)

    plain, guarded = kdna_fx.plan(Body(False)), kdna_fx.plan(Body(True))
    assert [(f.parent, f.children) for f in plain.families] == [(f.parent, f.children) for f in guarded.families]
    assert [len(f.children) for f in guarded.families] == [3]


def test_tied_weights_are_left_alone_and_a_module_under_two_paths_stays_one():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shared = nn.Conv2d(4, 4, 3, padding=1)
            self.a = nn.Sequential(shared, nn.Conv2d(4, 4, 3, padding=1))
            self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), shared)  # one module under two paths
            self.c = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
            self.c[1].weight = self.c[0].weight  # two modules, one weight: tied

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c(self.b(self.a(x)))
            return y if y.sum() > 0 else -y

    model = Tied()
    kmodel = kdna_fx.transform(model, KDNAConfig(stage_depth=0, only_if_smaller=False), init="trained")
    plan = kdna_fx.plan_of(kmodel)
    assert kmodel.a[0] is kmodel.b[1] and kmodel.c[1].weight is kmodel.c[0].weight  # both intact
    assert {s.name for s in plan.skipped if "tied" in s.reason} == {"c.0", "c.1"}
    assert [(f.parent, f.children) for f in plan.families] == [("a.0", ("a.1", "b.0"))]
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(kmodel.eval()(x), _expected_with_parent_kernels(model, kmodel).eval()(x))


# ---- (e) a torchvision detection model -------------------------------------------------------------------------
def test_torchvision_detection_model_is_transformed_and_trains_at_batch_one():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3).eval()
    kmodel = kdna_fx.transform(model)
    assert type(kmodel) is type(model) and type(kmodel.backbone) is type(model.backbone)
    assert sum(p.numel() for p in kmodel.parameters()) < sum(p.numel() for p in model.parameters())
    assert kdna_fx.plan_of(kmodel).families
    images = [torch.rand(3, 128, 128)]
    with torch.no_grad():
        out = kmodel.eval()(images)
    assert set(out[0]) == {"boxes", "labels", "scores"}
    # With a FrozenBatchNorm2d backbone (as torchvision builds it around pretrained weights) the default gates
    # train at batch 1, as the detector does.
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            owner, _, field = name.rpartition(".")
            setattr(model.get_submodule(owner), field, FrozenBatchNorm2d(m.num_features, eps=m.eps))
    kmodel = kdna_fx.transform(model)
    assert {m.norm_kind for m in kmodel.modules() if isinstance(m, kdna_fx.adapters.Gate)} == {"layer"}
    target = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])}]
    losses = kmodel.train()(images, target)
    sum(losses.values()).backward()


# ---- (f) nothing to trace, nothing to share ------------------------------------------------------------------
def test_nothing_traceable_and_nothing_to_share_returns_the_model_unchanged():
    class Hopeless(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 3, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return F.conv2d(x, self.weight, padding=1)
            return x

    torch.manual_seed(0)
    model = Hopeless()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kmodel = kdna_fx.transform(model)
    kinds = {type(w.message) for w in caught}
    assert kinds == {kdna_fx.NoEligibleConvWarning}
    assert type(kmodel) is Hopeless and kmodel is not model
    assert kmodel.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(kmodel.weight, model.weight, rtol=0, atol=0)
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(kmodel(x), model(x), rtol=0, atol=0)
    assert not kdna_fx.plan_of(kmodel).families
    assert kdna_fx.report(kmodel, x).order == "registration"
