"""report(): parameter counts as worked out by hand, MACs before equal to the original model's, readable output."""
from __future__ import annotations

import torch
import torchvision

import kdna_fx
from kdna_fx.reporting import count_macs


def test_resnet18_report_numbers():
    model = torchvision.models.resnet18()
    kmodel = kdna_fx.transform(model)
    x = torch.randn(1, 3, 64, 64)
    report = kdna_fx.report(kmodel, x)
    assert report.params_before == 11_689_512 == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in kmodel.parameters()) < report.params_before
    assert report.macs_before == count_macs(model, x)[0]  # derived before-MACs equal the original's
    assert report.macs_before < report.macs_after < report.macs_before * 1.01  # gates are cheap
    assert len(report.families) == 4 and {s["name"] for s in report.skipped} >= {"conv1", "layer2.0.conv1"}
    text = str(report)
    for needle in ("parameters", "11,689,512", "MACs @ 1x3x64x64", "layer1.0.conv1", "kernel 7x7"):
        assert needle in text
    assert report.to_dict()["params_after"] == report.params_after
    assert report.method == "KernelDNA" and set(report.converted) == {c for f in report.families for c in f["children"]}
    assert count_macs(kmodel, x) == (report.macs_after, report.macs_after - report.macs_before)  # the gates


def test_parameter_counts_follow_from_the_plan_by_hand():
    """Oracle independent of report(): each child drops its kernel and gains F, S and an SE gate (default config)."""
    model = torchvision.models.resnet18()
    kmodel = kdna_fx.transform(model)
    plan = kdna_fx.plan_of(kmodel)
    removed = added = 0
    for family in plan.families:
        assert not family.self_adapted
        for child in family.children:
            site = plan.sites[child]
            c_out, c_in, (kh, kw), g = site.out_channels, site.in_channels, site.kernel_size, site.groups
            h = c_in // 4  # gate width, reduction 4
            removed += c_out * (c_in // g) * kh * kw  # the child's own kernel: it reads the parent's
            added += c_out + kh * kw  # F [C_out], S [k, k]
            added += c_in * h + 2 * h + (h * c_in + c_in)  # fc1 (no bias), BatchNorm1d(h), fc2 with bias
    report = kdna_fx.report(kmodel, torch.randn(1, 3, 32, 32))
    assert report.params_before == 11_689_512
    assert report.params_after == report.params_before - removed + added
    assert (removed, added, report.params_after) == (6_303_744, 355_249, 5_741_017)  # README's table


def test_default_example_input_follows_the_first_conv():
    from kdna_fx.testing import TinyResNet

    report = kdna_fx.report(kdna_fx.transform(TinyResNet(in_chans=1)))
    assert report.input_shape == (1, 1, 224, 224)


def test_report_gives_every_module_back_its_own_mode():
    """A model with frozen BatchNorms (in eval inside a model in training) keeps them frozen after report()."""
    kmodel = kdna_fx.transform(torchvision.models.resnet18(num_classes=3)).train()
    frozen = kmodel.get_submodule("bn1")
    frozen.eval()
    kdna_fx.report(kmodel, torch.randn(1, 3, 32, 32))
    assert kmodel.training and kmodel.get_submodule("layer1.0.bn1").training and not frozen.training
