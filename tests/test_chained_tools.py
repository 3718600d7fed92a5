"""Tools users chain after kdna_fx.transform, the child-local half of issue 31: frozen parts stay frozen, kernel
rewrites of a parent (BatchNorm fusion, torch.ao quantization, pruning, parametrizations) are exact or raise a
KDNAError naming the fix, and saving, meta-device construction and MAC counters keep the model.

Every case runs on the module-swap path (children bound to their parent conv), with a function-preserving
reference: the transformed model before the tool, or the same model with the tool's kernel baked in."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize, prune

import kdna_fx
from kdna_fx import AdapterConfig, Family, KDNAConfig, KDNAError, ParentKernelError, Plan
from kdna_fx.adapters import ChildAdapter, Gate
from kdna_fx.datamodel import children
from kdna_fx.errors import ChildWeightError
from kdna_fx.testing import TinyResNet

pytestmark = pytest.mark.integration  # ResNet-18s through fusion, quantization, pruning, compile and saving

SWAP = KDNAConfig(rewrite="swap")
FROZEN = ("conv1", "bn1", "layer1")


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def _images(batch: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _perturb_adapters(kmodel: nn.Module) -> None:
    """Move every adapter off its initial value, as training or calibration would."""
    with torch.no_grad():
        for _, p in kdna_fx.adapters.adapter_parameters(kmodel):
            p.add_(0.05 * torch.randn_like(p))


# ---- frozen stays frozen -----------------------------------------------------------------------------------
def _frozen_stage(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))


def _sgd_step(model: nn.Module, x: torch.Tensor) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model(x).square().mean().backward()
    optimizer.step()


def test_a_frozen_stage_stays_bit_identical_through_an_sgd_step_as_in_the_original(dtype) -> None:
    original = _resnet()
    for name in FROZEN:
        original.get_submodule(name).requires_grad_(False)
    kmodel = kdna_fx.transform(original, SWAP).train()
    original.train()
    trainable = [n for n, p in kmodel.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if n.startswith(FROZEN)]
    frozen_families = [f for f in kdna_fx.plan_of(kmodel).families if f.frozen]
    assert [f.stage for f in frozen_families] == ["layer1"]
    assert not [f for f in kdna_fx.plan_of(kmodel).families if f.stage != "layer1" and f.frozen]
    x = _images()
    for model in (original, kmodel):
        before = _frozen_stage(model, x)
        _sgd_step(model, x)
        assert torch.equal(_frozen_stage(model, x), before)
    assert "frozen" in str(kdna_fx.report(kmodel, x[:1]))


def test_frozen_and_trainable_convs_never_share_a_family() -> None:
    model = _resnet()
    model.layer1[0].conv1.requires_grad_(False)  # one frozen 3x3 among layer1's four
    plan = kdna_fx.plan(model, SWAP)
    assert all(len({plan.sites[m].frozen for m in f.members}) == 1 for f in plan.families)
    assert "layer1.0.conv1" in {s.name for s in plan.skipped}
    trainable_plan = kdna_fx.plan(_resnet(), SWAP)  # made before the freeze: its layer1 family mixes them
    with pytest.raises(KDNAError, match="mix frozen"):
        kdna_fx.transform(model, SWAP, plan=trainable_plan)


def test_timm_freeze_after_transform_stops_the_gates_norm_statistics() -> None:
    timm = pytest.importorskip("timm")
    kmodel = kdna_fx.transform(_resnet(), SWAP).train()
    timm.utils.model.freeze(kmodel, ["layer1"])
    gates = [m for n, m in kmodel.named_modules() if isinstance(m, Gate) and n.startswith("layer1")]
    assert gates and all(g.frozen for g in gates)
    before = [b.clone() for g in gates for b in g.norm.buffers()]
    kmodel(_images())
    assert all(torch.equal(a, b) for a, b in zip(before, [b for g in gates for b in g.norm.buffers()]))


def test_a_frozen_gate_and_a_bound_child_compile_without_graph_breaks() -> None:
    # TinyResNet: one frozen family and one trainable, in the fewest ops for dynamo to trace (ResNet-18: 10 s).
    torch.manual_seed(0)
    kmodel = kdna_fx.transform(TinyResNet(width=4), SWAP).train()
    kmodel.layer1.requires_grad_(False)
    assert {child.gate.frozen for _, child, _ in children(kmodel)} == {True, False}
    compiled = torch.compile(kmodel, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    compiled(_images())
    kmodel.eval()
    compiled(_images())


# ---- kernel rewrites: exact or loud ------------------------------------------------------------------------
def test_torch_fx_fuse_of_an_unfolded_model_raises_and_of_the_folded_model_is_exact(dtype, tol) -> None:
    from torch.fx.experimental.optimization import fuse

    kmodel = kdna_fx.transform(_resnet(), SWAP).eval()
    _perturb_adapters(kmodel)
    with pytest.raises(ParentKernelError, match="kdna_fx.fold"):
        fuse(kmodel)
    folded = kdna_fx.fold(kmodel)
    x = _images()
    torch.testing.assert_close(fuse(folded)(x), kmodel(x), **tol)


@pytest.mark.parametrize("route", ["prepare_fx", "prepare_qat_fx"])
def test_torch_ao_prepare_of_an_unfolded_model_raises_naming_the_fix(route: str) -> None:
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
    from torch.ao.quantization import quantize_fx

    kmodel = kdna_fx.transform(_resnet(), SWAP)
    kmodel.train(route == "prepare_qat_fx")
    mapping = (get_default_qat_qconfig_mapping if route == "prepare_qat_fx" else get_default_qconfig_mapping)("x86")
    with pytest.raises(ParentKernelError, match="fuse and prepare before kdna_fx.transform"):
        getattr(quantize_fx, route)(kmodel, mapping, (_images(),))


def test_torch_nn_utils_fusion_of_a_parent_is_exact_and_of_a_child_raises(dtype, tol) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    kmodel = kdna_fx.transform(_resnet(), SWAP).eval()
    _perturb_adapters(kmodel)
    x = _images()
    expected = kmodel(x)
    block = kmodel.layer1[0]
    assert not isinstance(block.conv1, ChildAdapter) and isinstance(block.conv2, ChildAdapter)
    block.conv1, block.bn1 = fuse_conv_bn_eval(block.conv1, block.bn1), nn.Identity()
    torch.testing.assert_close(kmodel(x), expected, **tol)
    with pytest.raises(ChildWeightError, match="Fuse BatchNorms before kdna_fx.transform"):
        fuse_conv_bn_eval(block.conv2, block.bn2)


def test_ultralytics_fuse_raises_at_a_child_and_what_it_fused_before_stays_exact() -> None:
    from bench import thirdparty

    if not thirdparty.available("ultralytics-yolov8n"):
        pytest.skip("ultralytics is not installed")
    model = thirdparty.ultralytics_yolov8n().eval()
    x = torch.randn(1, 3, 64, 64)
    kmodel = kdna_fx.transform(model, SWAP, example_inputs=(x,)).eval()
    assert kdna_fx.plan_of(kmodel).families
    expected = kmodel(x)[0]
    with pytest.raises(ChildWeightError, match="Fuse BatchNorms before kdna_fx.transform"):
        kmodel.fuse()
    # the parents it fused first are new modules; their children still read the kernels they were bound to
    torch.testing.assert_close(kmodel(x)[0], expected, rtol=1e-4, atol=1e-4)


def _parent_last_plan() -> Plan:
    """layer1's family with its *last* conv as parent: every child runs before the parent in a forward."""
    return Plan((Family("layer1.1.conv2", ("layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1")),))


def test_children_follow_a_pruned_parent_exactly_and_keep_training(dtype, tol) -> None:
    kmodel = kdna_fx.transform(_resnet(), SWAP, plan=_parent_last_plan()).eval()
    _perturb_adapters(kmodel)
    reference = copy.deepcopy(kmodel)
    parent = kmodel.layer1[1].conv2
    prune.l1_unstructured(parent, "weight", amount=0.5)
    with torch.no_grad():
        reference.layer1[1].conv2.weight.mul_(parent.weight_mask)
    x = _images()
    torch.testing.assert_close(kmodel(x), reference(x), **tol)
    kmodel.train()
    for _ in range(2):  # the second step used to reach the kernel the first one's graph freed
        _sgd_step(kmodel, x)
    kmodel.eval()
    with torch.no_grad():
        expected = parent.weight_orig * parent.weight_mask
    torch.testing.assert_close(kmodel.layer1[0].conv1.parent_kernel, expected, rtol=0, atol=0)


class _Halve(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 0.5


def test_children_follow_a_parametrized_parent_exactly(dtype, tol) -> None:
    kmodel = kdna_fx.transform(_resnet(), SWAP).eval()
    _perturb_adapters(kmodel)
    reference = copy.deepcopy(kmodel)
    parametrize.register_parametrization(kmodel.layer1[0].conv1, "weight", _Halve())
    with torch.no_grad():
        reference.layer1[0].conv1.weight.mul_(0.5)
    x = _images()
    torch.testing.assert_close(kmodel(x), reference(x), **tol)


def test_children_follow_a_parent_kernel_substituted_by_functional_call(dtype, tol) -> None:
    kmodel = kdna_fx.transform(_resnet(), SWAP).eval()
    _perturb_adapters(kmodel)
    reference = copy.deepcopy(kmodel)
    with torch.no_grad():
        reference.layer1[0].conv1.weight.mul_(0.5)
    x = _images()
    halved = {"layer1.0.conv1.weight": kmodel.layer1[0].conv1.weight.detach() * 0.5}  # a plain tensor
    torch.testing.assert_close(torch.func.functional_call(kmodel, halved, (x,)), reference(x), **tol)


# ---- saving, loading, re-initialising ----------------------------------------------------------------------
RANKED = KDNAConfig(rewrite="swap", adapter=AdapterConfig(rank=2))
LAYER1 = Plan((Family("layer1.0.conv1", ("layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2")),))
"""One small family keeps init="trained" (an SVD per child) fast on a shared CPU."""


@pytest.mark.parametrize("init", ["copy", "trained"])
def test_the_state_dict_recipe_rebuilds_the_same_model(init: str, dtype, tol) -> None:
    kmodel = kdna_fx.transform(_resnet(), RANKED, plan=LAYER1, init=init).eval()
    _perturb_adapters(kmodel)  # as training or kdna_fx.calibrate would
    assert all(k in kmodel.state_dict() for k in (f"{n}.gate.scale" for n, m in kmodel.named_modules()
                                                   if isinstance(m, ChildAdapter)))
    rebuilt = kdna_fx.transform(_resnet(), RANKED, plan=kdna_fx.plan_of(kmodel))
    rebuilt.load_state_dict(kmodel.state_dict(), strict=True)
    x = _images()
    torch.testing.assert_close(rebuilt.eval()(x), kmodel(x), **tol)


def test_a_state_dict_saved_before_the_scale_was_stored_loads_with_the_scale_it_was_built_with() -> None:
    kmodel = kdna_fx.transform(_resnet(), RANKED, plan=LAYER1, init="trained").eval()
    _perturb_adapters(kmodel)
    old = {k: v for k, v in kmodel.state_dict().items() if not k.endswith(".gate.scale")}
    rebuilt = kdna_fx.transform(_resnet(), RANKED, plan=LAYER1, init="trained")
    rebuilt.load_state_dict(old, strict=True)
    x = _images()
    torch.testing.assert_close(rebuilt.eval()(x), kmodel(x))


def test_save_and_load_keep_a_trained_conversion_and_read_files_without_the_scale(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    kmodel = kdna_fx.transform(_resnet(), RANKED, plan=LAYER1, init="trained").eval()
    _perturb_adapters(kmodel)
    path, old_path = tmp_path / "m.safetensors", tmp_path / "old.safetensors"
    kdna_fx.save(kmodel, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file({k: v for k, v in load_file(str(path)).items() if not k.endswith(".gate.scale")}, str(old_path),
              metadata=metadata)  # as kdna_fx.save wrote it before the scale was a buffer
    x = _images()
    for where in (path, old_path):
        torch.testing.assert_close(kdna_fx.load(where, _resnet()).eval()(x), kmodel(x))


@pytest.mark.parametrize("init", ["copy", "trained"])
def test_a_model_transformed_on_the_meta_device_is_the_model_built_on_the_cpu(init: str) -> None:
    original = _resnet()
    on_cpu = kdna_fx.transform(original, RANKED, plan=LAYER1, init=init).eval()
    with torch.device("meta"):
        skeleton = torchvision.models.resnet18(weights=None, num_classes=10)
    on_meta = kdna_fx.transform(skeleton, RANKED, plan=LAYER1, init=init)
    x = _images()
    by_state = copy.deepcopy(on_meta).to_empty(device="cpu")
    by_state.load_state_dict(on_cpu.state_dict(), strict=True)
    torch.testing.assert_close(by_state.eval()(x), on_cpu(x), rtol=0, atol=0)
    by_original = kdna_fx.load_original(on_meta.to_empty(device="cpu"), original.state_dict()).eval()
    for name, child in by_original.named_modules():
        if isinstance(child, ChildAdapter):
            assert not child.filter_scale.any() and not child.spatial_scale.any()
            assert float(child.gate.scale) == (2.0 if init == "trained" else 1.0)
            assert torch.equal(child.gate.norm.running_var, torch.ones_like(child.gate.norm.running_var))
            assert torch.isfinite(child.lowrank_a).all() and child.lowrank_a.abs().max() < 10
    if init == "trained":  # identity gates and SVD residuals: nothing random left, the very model
        torch.testing.assert_close(by_original(x), on_cpu(x))
    else:
        assert torch.isfinite(by_original(x)).all()


# ---- MAC counters ------------------------------------------------------------------------------------------
def test_mac_counters_count_the_childrens_convolutions() -> None:
    thop = pytest.importorskip("thop")
    original = _resnet().eval()
    kmodel = kdna_fx.transform(original, SWAP).eval()
    x = _images(1, 64)
    total, added = kdna_fx.reporting.count_macs(kmodel, x)
    assert total - added == kdna_fx.reporting.count_macs(original, x)[0]
    macs = thop.profile(original, (x,), verbose=False)[0]
    counted = thop.profile(kmodel, (x,), custom_ops=kdna_fx.reporting.thop_custom_ops(), verbose=False)[0]
    assert macs <= counted <= macs + added
