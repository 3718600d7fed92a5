"""Bad input gets a clear error or a documented fallback, never a half-written model."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import kdna_fx
from kdna_fx import AdapterConfig, KDNAConfig
from kdna_fx.testing import TinyResNet


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        kdna_fx.transform(lambda x: x)
    with pytest.raises(TypeError, match="KDNAConfig"):
        kdna_fx.transform(TinyResNet(), config={"share": False})


def test_no_eligible_conv_warns_and_returns_the_model_unchanged(dtype, tol):
    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.Conv2d(4, 4, 5)).eval()
    with pytest.warns(kdna_fx.NoEligibleConvWarning, match="no convolutions to share"):
        kmodel = kdna_fx.transform(model)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(kmodel(x), model(x), **tol)
    report = kdna_fx.report(kmodel, x[:1])
    assert report.params_before == report.params_after and not report.families
    assert {s["name"] for s in report.skipped} == {"0", "2"}
    assert all("kernel 5x5" in s["reason"] for s in report.skipped)
    assert "kernel 5x5 is not in kernel_sizes" in str(report)


def test_compiled_model_is_unwrapped_with_a_warning():
    model = TinyResNet()
    with pytest.warns(kdna_fx.UnwrappedModelWarning, match="torch.compile"):
        kmodel = kdna_fx.transform(torch.compile(model))
    assert kdna_fx.plan_of(kmodel).families


def test_data_parallel_model_is_unwrapped_with_a_warning():
    with pytest.warns(kdna_fx.UnwrappedModelWarning, match="DataParallel"):
        kmodel = kdna_fx.transform(nn.DataParallel(TinyResNet()))
    assert kdna_fx.plan_of(kmodel).families


def test_transforming_twice_is_refused():
    kmodel = kdna_fx.transform(TinyResNet())
    with pytest.raises(kdna_fx.KDNAError, match="already converted by kdna_fx.transform"):
        kdna_fx.transform(kmodel)


def test_report_on_a_plain_model_says_to_transform_first():
    with pytest.raises(kdna_fx.KDNAError, match="call kdna_fx.transform"):
        kdna_fx.report(TinyResNet())


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_tiny_channel_counts_never_give_a_zero_width_gate(channels):
    model = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1))
    kmodel = kdna_fx.transform(model, KDNAConfig(stage_depth=0, adapter=AdapterConfig(reduction=16),
                                                 only_if_smaller=False))
    gate = kmodel.get_submodule("1").gate
    assert gate.fc1.out_features >= 1
    assert kmodel(torch.randn(2, channels, 5, 5)).shape == (2, channels, 5, 5)


def test_batch_of_one_in_training_with_gate_batchnorm_is_a_clear_error():
    kmodel = kdna_fx.transform(TinyResNet()).train()
    with pytest.raises(kdna_fx.GateBatchSizeError, match="gate_norm='layer'"):
        kmodel(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("norm", ["layer", "none"])
def test_gate_norm_option_trains_at_batch_size_one(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))  # gate width 4
    config = KDNAConfig(adapter=AdapterConfig(gate_norm=norm), only_if_smaller=False)
    kmodel = kdna_fx.transform(model, config).train()
    kmodel(torch.randn(1, 16, 8, 8)).square().sum().backward()
    gate = dict(kmodel.get_submodule("1").gate.named_parameters())
    assert {"fc1.weight", "fc2.weight", "fc2.bias"} <= set(gate)
    for name, p in gate.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert gate["fc1.weight"].grad.abs().sum() > 0  # the signal reaches fc1 through the norm at batch 1


def test_untraceable_model_names_the_module_and_operation():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.conv(x)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), DataDependent())

        def forward(self, x):
            return self.body(x)

    with pytest.raises(kdna_fx.KDNATraceError) as info:
        kdna_fx.transform(Net(), KDNAConfig(rewrite="graph"))
    err = info.value
    assert err.module_name == "body.2" and err.module_type == "DataDependent"
    assert "control flow" in err.operation
    assert "leaf_modules=(DataDependent,)" in str(err) and "if x.sum() > 0" in str(err)
    assert "test_bad_input.py" in err.source  # the user's line, not kdna_fx's nor torch's
    assert not isinstance(err, torch.fx.proxy.TraceError)
    # by default (rewrite="auto") no trace builds the model: it keeps its own forward, and the conv inside the
    # untraceable part is shared too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kmodel = kdna_fx.transform(Net())
    assert [f.children for f in kdna_fx.plan_of(kmodel).families] == [("body.1", "body.2.conv")]
    assert type(kmodel) is Net and type(kmodel.body[2]) is DataDependent
    # and the documented fix works: the opaque module runs as before, the rest is still shared
    kmodel = kdna_fx.transform(Net(), KDNAConfig(leaf_modules=(DataDependent,)))
    assert [f.children for f in kdna_fx.plan_of(kmodel).families] == [("body.1",)]
    assert kmodel.eval()(torch.randn(1, 3, 4, 4)).shape == (1, 3, 4, 4)


def test_bad_config_values_are_config_errors():
    with pytest.raises(kdna_fx.ConfigError, match="gate_norm"):
        AdapterConfig(gate_norm="group")
    with pytest.raises(kdna_fx.ConfigError, match="reduction"):
        AdapterConfig(reduction=0)
    with pytest.raises(kdna_fx.ConfigError, match="regex"):
        KDNAConfig(exclude="layer[")
    with pytest.raises(kdna_fx.ConfigError, match="min_family_size"):
        KDNAConfig(min_family_size=1)
    with pytest.raises(kdna_fx.ConfigError, match="unknown KDNAConfig keys"):
        KDNAConfig.from_dict({"kernel_size": [3]})
