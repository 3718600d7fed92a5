"""report(): parameters counted once, MACs before equal to the original model's, readable output."""
from __future__ import annotations

import torch
import torchvision

import kdna_fx
from kdna_fx.report import count_macs


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


def test_parameters_are_counted_once_when_shared():
    kmodel = kdna_fx.transform(torchvision.models.resnet18())
    unique = sum(p.numel() for p in {id(p): p for p in kmodel.parameters()}.values())
    assert kdna_fx.report(kmodel, torch.randn(1, 3, 32, 32)).params_after == unique


def test_default_example_input_follows_the_first_conv():
    from kdna_fx.testing import TinyResNet

    report = kdna_fx.report(kdna_fx.transform(TinyResNet(in_chans=1)))
    assert report.input_shape == (1, 1, 224, 224)
