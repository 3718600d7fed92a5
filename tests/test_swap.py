"""The module-swap path and the checks that decide it (passes/routing.py, passes/swapping.py; docs/partial-tracing.md).

A model whose trace cannot be trusted (untraceable Python, a forward that reads self.training, a trace that
differs from eager on the example inputs) keeps its own objects and forward; each child conv module is replaced in
place by a bound ChildAdapter. Every test here runs in float32 and float64 where numbers are compared.
"""
from __future__ import annotations

import copy
import dataclasses
import pickle
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrizations

import kdna_fx
from kdna_fx import AdapterConfig, KDNAConfig
from kdna_fx.adapters import ChildAdapter
from kdna_fx.datamodel import record_of
from kdna_fx.testing import TinyResNet

# Tier integration: make test-fast leaves it out (third-party-like models through the module swap, compiled and exported).
pytestmark = pytest.mark.integration

# The function-preserving configuration of the issue: every conv shared, every child reproducing its own
# kernel exactly (a full-rank residual from the SVD, identity gates).
PRESERVING = KDNAConfig(only_if_smaller=False, adapter=AdapterConfig(rank="full"))


def _block(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())


class Stage(nn.Module):
    """A container with a Python API its owner's forward relies on."""

    def __init__(self, c: int, n: int):
        super().__init__()
        self.blocks = nn.ModuleList(_block(c) for _ in range(n))
        self.width = c

    @property
    def output_stride(self) -> int:
        return 1

    def describe(self) -> str:
        return f"{len(self.blocks)} blocks of {self.width}"

    def __iter__(self):
        return iter(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class UsesItsParts(nn.Module):
    """Its forward reads a property, calls a method, iterates and indexes a child, checks its class, and has
    data-dependent control flow that torch.fx cannot trace."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = Stage(c, 4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.body.output_stride == 1 and self.body.describe().startswith("4 blocks")
        assert isinstance(self.body, Stage) and isinstance(self.body.blocks[0], nn.Sequential)
        x = self.stem(x)
        if x.mean() > 100:  # data-dependent: torch.fx cannot trace the forward
            x = x * 0
        for block in self.body:
            x = block(x)
        return self.head(x)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def dtype(request):
    return request.param


def _tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-10


def _eval_equal(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def test_parts_keep_their_python_api_and_are_shared(dtype):
    model = UsesItsParts().to(dtype)
    kmodel = kdna_fx.transform(model)
    assert type(kmodel) is UsesItsParts and type(kmodel.body) is Stage
    plan = kdna_fx.plan_of(kmodel)
    # whole-model planning: the stage is 'body' (from the model's root), so three of the four blocks share
    assert [(f.parent, f.children) for f in plan.families] == [("body.blocks.0.0", ("body.blocks.1.0",
                                                                                    "body.blocks.2.0", "body.blocks.3.0"))]
    assert isinstance(kmodel.body.blocks[1][0], ChildAdapter) and isinstance(kmodel.body.blocks[0][0], nn.Conv2d)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    assert kmodel.eval()(x).shape == (2, 5)
    kmodel.train()(x).sum().backward()
    parent = kmodel.body.blocks[0][0].weight
    assert parent.grad is not None and parent.grad.abs().sum() > 0
    assert sum(p.numel() for p in kmodel.parameters()) < sum(p.numel() for p in model.parameters())


def test_swapped_init_trained_at_full_rank_preserves_the_function(dtype):
    model = UsesItsParts().to(dtype).eval()
    x = torch.randn(3, 3, 8, 8, dtype=dtype)
    kmodel = kdna_fx.transform(model, PRESERVING, init="trained", example_inputs=(x,))
    assert kdna_fx.plan_of(kmodel).families
    assert _eval_equal(model, kmodel, x) < _tol(dtype)
    assert _eval_equal(model, kdna_fx.fold(kmodel), x) < _tol(dtype)


def test_the_graph_form_equals_the_model_with_the_same_state(dtype):
    model = torchvision.models.resnet18(num_classes=4).to(dtype)
    graph = kdna_fx.transform(model, KDNAConfig(rewrite="graph"))
    swapped = kdna_fx.transform(model)
    assert isinstance(graph, torch.fx.GraphModule) and type(swapped) is torchvision.models.ResNet
    assert graph.state_dict().keys() == swapped.state_dict().keys()
    kdna_fx.testing.randomize_adapters(graph)
    swapped.load_state_dict(graph.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    assert _eval_equal(graph, swapped, x) < _tol(dtype)
    assert _eval_equal(kdna_fx.fold(graph), kdna_fx.fold(swapped), x) < _tol(dtype)
    with torch.no_grad():
        assert float((graph.train()(x) - swapped.train()(x)).abs().max()) < _tol(dtype)


def test_swapped_model_saves_loads_and_pickles(tmp_path, dtype):
    model = UsesItsParts().to(dtype)
    kmodel = kdna_fx.transform(model)
    kdna_fx.testing.randomize_adapters(kmodel)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    kdna_fx.save(kmodel, tmp_path / "m.safetensors")
    loaded = kdna_fx.load(tmp_path / "m.safetensors", UsesItsParts().to(dtype))
    assert type(loaded) is UsesItsParts
    assert _eval_equal(kmodel, loaded, x) == 0.0
    for copied in (pickle.loads(pickle.dumps(kmodel)), copy.deepcopy(kmodel)):
        assert _eval_equal(kmodel, copied, x) == 0.0
        # the copy's children read the copy's parent, not the original's
        child = copied.body.blocks[1][0]
        assert child.__dict__["_parent_module"] is copied.body.blocks[0][0]


@pytest.mark.parametrize("rewrite", ["graph", "auto"])
def test_whole_object_torch_save_round_trips(tmp_path, rewrite):
    model = torchvision.models.resnet18(num_classes=3)
    kmodel = kdna_fx.transform(model, KDNAConfig(rewrite=rewrite))
    kdna_fx.testing.randomize_adapters(kmodel)
    torch.save(kmodel, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    assert _eval_equal(kmodel, loaded, x) == 0.0
    # the record and (for a graph) its module form survive, so fold and report still work on the loaded copy
    assert type(loaded) is type(kmodel) or rewrite == "graph"
    assert _eval_equal(kdna_fx.fold(kmodel), kdna_fx.fold(loaded), x) == 0.0
    assert _eval_equal(copy.deepcopy(loaded), loaded, x) == 0.0 and record_of(copy.deepcopy(loaded)).plan.families


# ---- the training mode stays live ----------------------------------------------------------------------
class NoisyInTraining(nn.Module):
    """Samples noise only in training, in Python (a VAE's reparameterisation, stochastic depth)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*(_block(4) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        if self.training:
            x = x + torch.randn_like(x)
        return x


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_forward_that_reads_the_training_mode_follows_the_mode_it_runs_in(mode):
    model = NoisyInTraining()
    model.train(mode == "train")
    kmodel = kdna_fx.transform(model)
    assert type(kmodel) is NoisyInTraining and kdna_fx.plan_of(kmodel).families
    with pytest.raises(kdna_fx.KDNAError, match="reads the training mode"):
        kdna_fx.transform(model, KDNAConfig(rewrite="graph"))
    x = torch.randn(2, 4, 6, 6)
    kmodel.eval()
    assert torch.equal(kmodel(x), kmodel(x))  # no noise in eval
    kmodel.train()
    assert not torch.equal(kmodel(x), kmodel(x))  # noise in training


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.googlenet(num_classes=5, aux_logits=True, init_weights=True),
    lambda: torchvision.models.inception_v3(num_classes=5, aux_logits=True, init_weights=True),
], ids=["googlenet", "inception_v3"])
def test_auxiliary_heads_follow_the_mode(build):
    model = build()  # built in train mode, as a user gets it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kmodel = kdna_fx.transform(model, KDNAConfig(kernel_sizes=(1, 3), stage_depth=0, only_if_smaller=False))
    assert type(kmodel) is type(model) and kdna_fx.plan_of(kmodel).families
    size = 96 if "GoogLeNet" in type(model).__name__ else 299
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert type(kmodel.eval()(x)) is torch.Tensor  # the original returns a Tensor in eval
        out = kmodel.train()(x)
    assert type(out).__name__ in ("GoogLeNetOutputs", "InceptionOutputs") and out[1] is not None  # aux heads ran


# ---- checked traces --------------------------------------------------------------------------------------
class TraceDropsASkip(nn.Module):
    """Like MONAI's UpCat: a Python check that is False for an fx Proxy drops the skip connection from the
    trace, without changing any shape, so the traced model silently computes something else."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.convs[0](x)
        y = self.convs[1](skip)
        if torch.jit.isinstance(skip, torch.Tensor):  # False while torch.fx traces
            y = y + skip
        return self.convs[2](y)


def test_a_trace_that_differs_from_eager_never_builds_the_model(dtype):
    model = TraceDropsASkip().to(dtype).eval()
    x = torch.randn(2, 4, 5, 5, dtype=dtype)
    for inputs in ((x,), None):  # with and without example inputs: no trace builds the result
        kmodel = kdna_fx.transform(model, PRESERVING, init="trained", example_inputs=inputs)
        assert type(kmodel) is TraceDropsASkip and _eval_equal(model, kmodel, x) < _tol(dtype)
        # the graph form is checked, on the example inputs or on inputs it infers
        with pytest.raises(kdna_fx.KDNAError, match="output differs"):
            kdna_fx.transform(model, dataclasses.replace(PRESERVING, rewrite="graph"), init="trained",
                              example_inputs=inputs)


def test_example_inputs_that_do_not_fit_the_model_are_a_clear_error():
    with pytest.raises(kdna_fx.KDNAError, match="example inputs do not run"):
        kdna_fx.transform(TraceDropsASkip(), example_inputs=(torch.randn(1, 3, 5, 5),))


def test_example_inputs_order_swapped_families_by_call_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.a(self.b(x))

    config = KDNAConfig(rewrite="swap", stage_depth=0, only_if_smaller=False)
    assert kdna_fx.plan(Reversed(), config).families[0].parent == "b"  # the order of the calls in a trace
    planned = kdna_fx.plan(Reversed(), config, example_inputs=(torch.randn(2, 4, 5, 5),))
    assert planned.families[0].parent == "b"  # the order the convs ran in


# ---- compile and export ----------------------------------------------------------------------------------
def test_a_swapped_model_adds_no_graph_break():
    kmodel = kdna_fx.transform(TinyResNet(), KDNAConfig(rewrite="swap")).eval()
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(kmodel)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(kmodel, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert float((compiled(x) - kmodel(x)).abs().max()) < 1e-5


def test_a_swapped_model_has_the_graph_breaks_of_the_original_and_no_more():
    model = UsesItsParts().eval()
    kmodel = kdna_fx.transform(model).eval()
    x = torch.randn(2, 3, 8, 8)
    counts = []
    for m in (model, kmodel):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(m)(x)
        counts.append((explained.graph_count, explained.graph_break_count))
    assert counts[0] == counts[1] and counts[0][1] >= 1  # the original's data-dependent `if` breaks both


def test_a_swapped_model_exports():
    kmodel = kdna_fx.transform(TinyResNet(), KDNAConfig(rewrite="swap")).eval()
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(kmodel, (x,))
    with torch.no_grad():
        assert float((exported.module()(x) - kmodel(x)).abs().max()) < 1e-5
    # each shared kernel is one parameter of the exported program, under its parent's name
    parents = {kdna_fx.plan_of(kmodel).parent_weight(f) for f in kdna_fx.plan_of(kmodel).families}
    assert parents and parents <= set(exported.state_dict)
    assert len(exported.graph_signature.parameters) == len(list(kmodel.parameters()))  # none twice


def test_the_peers_convert_a_model_torch_fx_cannot_trace():
    model = UsesItsParts()
    converted = kdna_fx.peers.odconv(model, kernel_num=1)
    assert type(converted) is UsesItsParts and isinstance(converted.body.blocks[1][0], kdna_fx.peers.ODConv2d)
    x = torch.randn(2, 3, 8, 8)
    assert converted.eval()(x).shape == (2, 5)
    assert kdna_fx.peers.describe(converted, x[:1]).params_after > kdna_fx.peers.describe(converted, x[:1]).params_before
    with pytest.raises(kdna_fx.KDNAError, match="already converted"):
        kdna_fx.peers.condconv(converted)


# ---- code written for nn.Conv2d --------------------------------------------------------------------------
def test_reading_a_childs_weight_is_a_clear_error_not_a_silent_fusion():
    kmodel = kdna_fx.transform(torchvision.models.resnet18(), KDNAConfig(rewrite="swap"))
    child = kmodel.layer1[0].conv2
    with pytest.raises(kdna_fx.KDNAError, match="Fuse BatchNorms before kdna_fx.transform"):
        child.weight.view(-1)
    # initialisers that loop over nn.Conv2d reach the parents, not the children
    assert not isinstance(child, nn.Conv2d)


# ---- gates that fit the model ----------------------------------------------------------------------------
def test_the_default_gate_norm_follows_the_models_own_norms():
    gn = nn.Sequential(*(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)) for _ in range(3)))
    kmodel = kdna_fx.transform(gn, KDNAConfig(stage_depth=0))
    gates = [m for m in kmodel.modules() if isinstance(m, kdna_fx.adapters.Gate)]
    assert gates and all(g.norm_kind == "layer" for g in gates)
    kmodel.train()(torch.randn(1, 8, 5, 5)).sum().backward()  # trains at batch 1, as the model does
    assert kdna_fx.plan_of(kmodel).config.adapter.gate_norm == "layer"  # resolved in the record
    bn = kdna_fx.transform(torchvision.models.resnet18())
    assert {m.norm_kind for m in bn.modules() if isinstance(m, kdna_fx.adapters.Gate)} == {"batch"}
    explicit = kdna_fx.transform(gn, KDNAConfig(stage_depth=0, adapter=AdapterConfig(gate_norm="batch")))
    assert {m.norm_kind for m in explicit.modules() if isinstance(m, kdna_fx.adapters.Gate)} == {"batch"}


# ---- rank ---------------------------------------------------------------------------------------------------
def test_rank_full_and_ranks_above_it_clamp_per_conv():
    model = torchvision.models.resnet18()
    full = kdna_fx.transform(model, KDNAConfig(only_if_smaller=False, adapter=AdapterConfig(rank="full")))
    huge = kdna_fx.transform(model, KDNAConfig(only_if_smaller=False, adapter=AdapterConfig(rank=36864)))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(full) == count(huge) < 3 * count(model)
    child = full.get_submodule("layer1.0.conv2")
    assert child.lowrank_b.shape == (64, 64) and child.lowrank_a.shape == (64, 576)
    with pytest.raises(kdna_fx.ConfigError, match="'full'"):
        AdapterConfig(rank="max")
    assert KDNAConfig.from_dict(KDNAConfig(adapter=AdapterConfig(rank="full")).to_dict()).adapter.rank == "full"


# ---- parametrized convs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", [parametrizations.weight_norm, parametrizations.spectral_norm,
                                  torch.nn.utils.weight_norm], ids=["weight_norm", "spectral_norm", "old_weight_norm"])
def test_parametrized_convs_are_left_alone_with_the_reason(wrap):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        convs = [nn.Conv2d(4, 4, 3, padding=1) for _ in range(4)]
        convs[1] = wrap(convs[1])
    model = nn.Sequential(*convs)
    config = KDNAConfig(stage_depth=0, only_if_smaller=False)
    old_style = wrap is torch.nn.utils.weight_norm
    if old_style:  # torch cannot deep-copy it: a clear error, and the fix it names works
        with pytest.raises(kdna_fx.KDNAError, match="inplace=True"):
            kdna_fx.transform(model, config)
    kmodel = kdna_fx.transform(model, config, inplace=old_style)
    plan = kdna_fx.plan_of(kmodel)
    assert "1" not in [m for f in plan.families for m in f.members]
    assert any(s.name == "1" and "parametrization" in s.reason for s in plan.skipped)
    x = torch.randn(2, 4, 5, 5)
    assert kmodel.eval()(x).shape == (2, 4, 5, 5)
