"""The model zoo: exact reference counts, training at small size, parent kernels owned once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import kdna_fx.models as zoo
from kdna_fx import functional as KF
from kdna_fx.adapters import ChildAdapter, adapter_parameters
from kdna_fx.errors import GateBatchSizeError
from kdna_fx.reporting import count_macs

# name: (parameters, MACs) at 1000 classes, 3x224x224, from docs/shared KERNELDNA.md.
REFERENCE = {
    "kdna_resnet18": (9_240_798, 2.277e9),
    "kdna_resnet50": (22_778_060, 4.308e9),
    "kdna_mobilenet_v2": (3_136_840, 300.9e6),
    "kdna_mobilenet_v2_050": (1_878_232, 97.2e6),
    # Our own design (no reference): the counts documented in docs/models.md.
    "kdna_convnext_tiny": (21_069_352, 4.459e9),
}
SMALL = dict(num_classes=10, in_chans=1, small_stem=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small_kwargs(name: str) -> dict:
    kwargs = dict(SMALL)
    if "width" in zoo.model_options(name):
        kwargs["width"] = 0.25
    return kwargs


def children_of(model: nn.Module) -> list[ChildAdapter]:
    return [m for m in model.modules() if isinstance(m, ChildAdapter)]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_params_and_macs(name: str) -> None:
    params, macs = REFERENCE[name]
    model = zoo.create_model(name)
    assert n_params(model) == params
    total, _ = count_macs(model, torch.randn(1, 3, 224, 224))
    assert abs(total - macs) / macs < 0.005, total


@pytest.mark.parametrize("name", zoo.list_models())
def test_forward_backward_small(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.create_model(name, **small_kwargs(name))
    x = torch.randn(2, 1, 28, 28)
    y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", zoo.list_models("*.kdna"))
def test_children_start_as_parent_copies(name: str) -> None:
    model = zoo.create_model(name, **small_kwargs(name))
    kids = children_of(model)
    assert kids, "a KernelDNA model must hold children"
    for child in kids:
        parent = model.get_submodule(child.parent)
        assert isinstance(parent, nn.Conv2d) and child.held_weight is None
        assert torch.equal(child.filter_scale, torch.zeros_like(child.filter_scale))
        if child.spatial_scale is not None:
            assert torch.equal(child.spatial_scale, torch.zeros_like(child.spatial_scale))
        # Its kernel is the parent's, bit for bit, and without the gate it computes the parent's conv.
        assert torch.equal(KF.modulate(parent.weight, child.filter_scale, child.spatial_scale), parent.weight)
        x = torch.randn(2, child.in_channels, 9, 9)
        ref = nn.functional.conv2d(x, parent.weight, child.bias, child.stride, child.padding, child.dilation,
                                   child.groups)
        child.gate = None
        torch.testing.assert_close(child(x, parent.weight), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", zoo.list_models("*.kdna"))
def test_each_tensor_stored_once(name: str, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model = zoo.create_model(name, **small_kwargs(name))
    named = list(model.named_parameters(remove_duplicate=False))
    assert len({id(p) for _, p in named}) == len(named), "a Parameter is registered under two names"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "m.safetensors")
    assert set(load_file(tmp_path / "m.safetensors")) == set(model.state_dict())


@pytest.mark.parametrize("name", zoo.list_models("*.kdna"))
def test_parent_gradient_is_the_sum_over_its_users(name: str) -> None:
    """Oracle: a copy in which every child reads its own copy of the parent kernel (untie_parents). The tied
    kernel's gradient must be the parent's own plus every copy's."""
    from kdna_fx.testing import randomize_adapters, untie_parents

    torch.manual_seed(0)
    model = zoo.create_model(name, **small_kwargs(name)).double().eval()
    randomize_adapters(model)
    untied, copies = untie_parents(model)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    model(x).square().mean().backward()
    untied(x).square().mean().backward()
    assert copies
    for parent, names in copies.items():
        summed = untied.get_parameter(parent).grad + sum(untied.get_parameter(n).grad for n in names)
        torch.testing.assert_close(model.get_parameter(parent).grad, summed, rtol=1e-9, atol=1e-12)
        assert all(untied.get_parameter(n).grad.abs().sum() > 0 for n in names), "a child passes no gradient"


def test_convnext_count_follows_the_documented_closed_form() -> None:
    """docs/models.md: each child block of width C changes the count by -5.5 C^2 + 11 C (kernels shared away,
    gates and F added); stages of 96, 192, 384, 768 have 1, 1, 5, 1 child blocks."""
    base = n_params(torchvision.models.convnext_tiny())
    change = sum(n * (-5.5 * c * c + 11 * c) for c, n in zip((96, 192, 384, 768), (1, 1, 5, 1)))
    assert n_params(zoo.create_model("kdna_convnext_tiny")) == base + change == 21_069_352


@pytest.mark.parametrize("ours, theirs", [
    (lambda: zoo.resnet.ResNet(zoo.resnet.BasicBlock, (2, 2, 2, 2), num_classes=7),
     lambda: torchvision.models.resnet18(num_classes=7)),
    (lambda: zoo.resnet.ResNet(zoo.resnet.Bottleneck, (3, 4, 6, 3), num_classes=7),
     lambda: torchvision.models.resnet50(num_classes=7)),
    (lambda: zoo.mobilenet.MobileNetV2(num_classes=7, width=0.5),
     lambda: torchvision.models.mobilenet_v2(num_classes=7, width_mult=0.5)),
    (lambda: zoo.convnext.ConvNeXt(num_classes=7, width=0.25),
     lambda: zoo.create_model("convnext_tiny", num_classes=7, width=0.25)),  # torchvision's ConvNeXt class
    (lambda: zoo.convnext.ConvNeXt(num_classes=7), lambda: torchvision.models.convnext_tiny(num_classes=7)),
], ids=["resnet18", "resnet50", "mobilenet_v2_050", "convnext_tiny_025", "convnext_tiny"])
def test_plain_classes_equal_torchvision(ours, theirs) -> None:
    """The plain networks under the reference topologies are the torchvision architectures."""
    ours, theirs = ours(), theirs()
    assert n_params(ours) == n_params(theirs)
    x = torch.randn(1, 3, 32, 32)
    assert count_macs(ours, x) == count_macs(theirs, x)
    if isinstance(ours, zoo.resnet.ResNet):  # same names too: width != 1 baselines use this class
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_width_scales_resnets() -> None:
    for name in ("resnet18", "replace_resnet18", "kdna_resnet18"):
        half, full = zoo.create_model(name, num_classes=10, width=0.5), zoo.create_model(name, num_classes=10)
        assert n_params(half) < 0.35 * n_params(full)


def test_unknown_model_lists_available() -> None:
    with pytest.raises(ValueError, match="kdna_resnet18") as info:
        zoo.create_model("kdna_resnet81")
    assert "Did you mean" in str(info.value)


def test_bad_options_are_named() -> None:
    with pytest.raises(TypeError, match="width"):
        zoo.create_model("kdna_resnet18", widht=0.5)
    with pytest.raises(ValueError, match="width"):
        zoo.create_model("kdna_resnet18", width=0)
    with pytest.raises(ValueError, match="num_classes"):
        zoo.create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="gate_norm"):
        zoo.create_model("kdna_resnet18", gate_norm="group")


def test_small_stem_keeps_resolution() -> None:
    model = zoo.create_model("kdna_resnet18", **SMALL, width=0.25)
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.stride == (1, 1)
    assert model.conv1.in_channels == 1


def test_gate_norm_layer_trains_at_batch_one() -> None:
    model = zoo.create_model("kdna_resnet18", **SMALL, width=0.25, gate_norm="layer").train()
    model(torch.randn(1, 1, 28, 28)).sum().backward()
    grads = [p.grad for _, p in adapter_parameters(model)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_gate_norm_batch_at_batch_one_is_a_clear_error() -> None:
    model = zoo.create_model("kdna_resnet18", **SMALL, width=0.25).train()
    with pytest.raises(GateBatchSizeError, match="gate_norm='layer'"):
        model(torch.randn(1, 1, 28, 28))


@pytest.mark.parametrize("name", [f"kdna_{n.split('.')[0]}" for n in zoo.list_models("*.kdna")])
def test_old_checkpoints_keep_their_state_dict(name: str) -> None:
    """Checkpoints written by `kdna train` before the zoo went through the pass still load: the state-dict
    names, shapes and order and the parameter order (optimizer state) are the v0.1 ones, recorded in
    tests/golden/zoo_state_v0_1.json by the v0.1 zoo. The gates' scale buffers came later (issue 31): a
    state dict without them loads strictly, each gate keeping the scale it was built with."""
    golden = json.loads((Path(__file__).parent / "golden" / "zoo_state_v0_1.json").read_text())
    for setting in ("small", "default"):
        entry = golden[f"{name}/{setting}"]
        model = zoo.create_model(name, **entry["options"])
        old = {k: v for k, v in model.state_dict().items() if not k.endswith(".gate.scale")}
        assert [[k, list(v.shape)] for k, v in old.items()] == entry["state"]
        assert [k for k, _ in model.named_parameters()] == entry["parameters"]
        model.load_state_dict(old, strict=True)


@pytest.mark.parametrize("arch, kernel_sizes, depthwise", [("resnet18", (3,), False), ("mobilenet_v2", (1,), False),
                                                           ("convnext_tiny", (7,), True)])
def test_sharing_config_is_the_one_default_of_replace_mode_train_and_convert(arch, kernel_sizes, depthwise) -> None:
    """replace_<arch>, `kdna train --gate-norm` and `kdna convert` take the architecture's sharing from one
    place, so a gate-norm option no longer drops MobileNetV2's 1x1 or ConvNeXt's depthwise sharing."""
    from kdna_fx import plan_of
    from kdna_fx.source import model_spec

    for name in (arch, f"replace_{arch}", f"kdna_{arch}"):
        config = zoo.sharing_config(name)
        assert (config.kernel_sizes, config.depthwise) == (kernel_sizes, depthwise)
    assert zoo.sharing_config("vgg11").kernel_sizes == (3,)  # any other (torchvision) name: the 3x3 default
    spec = model_spec(f"replace_{arch}", num_classes=10, in_chans=1, small_stem=True, width=0.25, gate_norm="layer")
    config = plan_of(spec.build()).config
    assert (config.kernel_sizes, config.depthwise, config.adapter.gate_norm) == (kernel_sizes, depthwise, "layer")
