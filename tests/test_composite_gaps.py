"""A model that took the module swap (docs/partial-tracing.md) works with CKA and layer-wise calibration: they
see its swapped children by their names from the model's root, with the numbers a graph rewrite of the same
body gives; its parts keep their attributes, since they are the user's own objects."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kdna_fx
from kdna_fx.calibration import calibrate
from kdna_fx.cka import layer_similarity
from kdna_fx.testing import TinyResNet

pytestmark = [pytest.mark.usefixtures("one_thread")]


class Checked(nn.Module):
    """A traceable ResNet body under a top-level forward torch.fx cannot trace (it always takes the first
    branch, so the composite computes exactly what the body does)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyResNet(width=4, num_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() >= 0:  # data-dependent control flow
            return self.body(x)
        return -self.body(x)


def _pair(seed: int = 1, init: str = "copy") -> tuple[nn.Module, nn.Module, nn.Module]:
    """(original, its transform, its body transformed alone with the same seed)."""
    torch.manual_seed(0)
    net = Checked().eval()
    torch.manual_seed(seed)
    composite = kdna_fx.transform(net, init=init)
    torch.manual_seed(seed)
    alone = kdna_fx.transform(net.body, init=init)
    assert type(composite) is Checked and type(composite.body) is TinyResNet and type(alone) is TinyResNet
    return net, composite, alone


def _rooted(name: str) -> str:
    return name if name.startswith("body.") else f"body.{name}"


def test_layer_similarity_sees_the_child_convs_inside_a_composites_parts():
    net, composite, alone = _pair()
    data = torch.randn(16, 3, 8, 8)
    measured = layer_similarity(composite, data, progress=False)
    children = {_rooted(c) for f in kdna_fx.plan_of(composite).families for c in f.children}
    assert children and children <= set(measured.names)
    # The same layers, in the same order, as the original model and as the body transformed alone.
    assert measured.names == layer_similarity(net, data, progress=False).names
    reference = layer_similarity(alone, data, progress=False)
    assert sorted(measured.names) == sorted(f"body.{n}" for n in reference.names)
    index = [reference.names.index(n[len("body."):]) for n in measured.names]
    torch.testing.assert_close(measured.matrix, reference.matrix[index][:, index])
    # Asking for one child by its root name works, and the part's forward is its own again afterwards.
    child = sorted(children)[0]
    assert layer_similarity(composite, data, layers=[child], progress=False).names == [child]


def test_layerwise_calibration_fits_the_children_inside_a_composites_parts():
    net, composite, alone = _pair(init="trained")
    data = torch.randn(32, 3, 8, 8)
    layerwise = kdna_fx.CalibrationConfig(modes=("layerwise",), layerwise_steps=5, batch_size=16, progress=False)
    report = calibrate(composite, data, layerwise, reference=net)
    (result,) = report.modes
    children = {_rooted(c) for f in kdna_fx.plan_of(composite).families for c in f.children}
    assert set(result.children) == children and result.steps == 5 * len(children)
    # Exactly what calibrating the body alone against the original body does, under root names.
    expected = calibrate(alone, data, layerwise, reference=net.body)
    assert list(result.children) == [f"body.{n}" for n in expected.modes[0].children]
    torch.testing.assert_close(torch.tensor(list(result.children.values())),
                               torch.tensor(list(expected.modes[0].children.values())), rtol=1e-4, atol=1e-6)
    assert all(after < before for before, after in result.children.values())


def test_distilling_parents_trains_the_shared_kernels_inside_a_composites_parts():
    net, composite, _ = _pair(init="trained")
    plan = kdna_fx.plan_of(composite)
    parents = {f.parent: composite.get_parameter(plan.parent_weight(f)) for f in plan.families}
    before = {name: p.detach().clone() for name, p in parents.items()}
    config = kdna_fx.CalibrationConfig(modes=("distill",), steps=3, batch_size=8, train="parents", progress=False)
    calibrate(composite, torch.randn(16, 3, 8, 8), config, reference=copy.deepcopy(net))
    assert all(not torch.equal(before[n], p) for n, p in parents.items())


class ReadsAttributes(nn.Module):
    """Like RAFT, whose forward reads ``self.update_block.hidden_state_size`` of a child that gets rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyResNet(width=4, num_classes=3)
        self.body.out_features = 3  # a plain attribute the traced graph never reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        assert y.shape[1] == self.body.out_features
        return y if x.abs().sum() >= 0 else -y  # data-dependent control flow


def test_a_swapped_part_keeps_the_plain_attributes_its_parents_forward_reads():
    kmodel = kdna_fx.transform(ReadsAttributes())
    assert type(kmodel.body) is TinyResNet and kmodel.body.out_features == 3
    assert kmodel(torch.randn(2, 3, 8, 8)).shape == (2, 3)
