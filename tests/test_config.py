"""Configuration precedence, plan options, determinism, and the plain-dict round trip."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch.nn.functional as F
from torch import nn

import kdna_fx
from kdna_fx import AdapterConfig, KDNAConfig
from kdna_fx.testing import FunctionalConvNet, TinyResNet

A, B, C, D = (AdapterConfig(reduction=r) for r in (2, 3, 5, 7))


def test_precedence_name_then_regex_then_type_then_global():
    config = KDNAConfig(adapter=A, by_type={nn.Conv2d: B}, by_name_regex=[(r"layer1\.1", C), (r"layer1", None)],
                        by_name={"layer1.1.conv2": D})
    assert config.adapter_for("layer1.1.conv2", nn.Conv2d) is D       # exact name wins
    assert config.adapter_for("layer1.1.conv1", nn.Conv2d) is C       # first matching regex
    assert config.adapter_for("layer1.0.conv1", nn.Conv2d) is None    # a later regex, None = skip
    assert config.adapter_for("layer2.0.conv1", nn.Conv2d) is B       # by type
    assert config.adapter_for("weights.0", F.conv2d) is A              # global


def test_config_choices_reach_the_rewritten_model():
    config = KDNAConfig(by_name={"layer1.1.conv1": AdapterConfig(gate=False, spatial_scale=False)},
                        by_name_regex=[(r"^layer2", None)])
    kmodel = kdna_fx.transform(TinyResNet(), config)
    plan = kdna_fx.plan_of(kmodel)
    assert all(not f.parent.startswith("layer2") for f in plan.families)
    assert any(s.name.startswith("layer2") and "None" in s.reason for s in plan.skipped)
    child = kmodel.get_submodule("layer1.1.conv1")
    assert child.gate is None and child.spatial_scale is None and child.filter_scale is not None


def test_plan_options_kernel_sizes_depthwise_stage_depth_and_limits():
    model = TinyResNet()
    assert [len(f.children) for f in kdna_fx.plan(model).families] == [3, 2]
    assert [len(f.children) for f in kdna_fx.plan(model, KDNAConfig(max_children=1)).families] == [1, 1, 1]
    split = kdna_fx.plan(model, KDNAConfig(max_children=2))
    assert [(f.parent, len(f.children)) for f in split.families] == [("layer1.0.conv1", 2), ("layer2.0.conv2", 2)]
    assert [s.name for s in split.skipped if "max_children" in s.reason] == ["layer1.1.conv2"]
    assert not kdna_fx.plan(model, KDNAConfig(min_family_size=5)).families
    assert kdna_fx.plan(model, KDNAConfig(include=r"^layer2")).families[0].stage == "layer2"
    assert len(kdna_fx.plan(model, KDNAConfig(exclude=r"^layer1")).families) == 1
    pointwise = kdna_fx.plan(model, KDNAConfig(kernel_sizes=(1,)))
    assert not pointwise.families and all("kernel" in s.reason or "no family" in s.reason for s in pointwise.skipped)
    two_stages = nn.Sequential(*(nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)) for _ in range(2)))
    assert [f.children for f in kdna_fx.plan(two_stages).families] == [("0.1",), ("1.1",)]
    whole = kdna_fx.plan(two_stages, KDNAConfig(stage_depth=0))
    assert [(f.stage, f.parent, f.children) for f in whole.families] == [("", "0.0", ("0.1", "1.0", "1.1"))]


def test_depthwise_is_opt_in():
    model = nn.Sequential(*(nn.Conv2d(4, 4, 3, padding=1, groups=4) for _ in range(3)))
    assert not kdna_fx.plan(model).families
    assert "depthwise" in kdna_fx.plan(model).skipped[0].reason
    assert len(kdna_fx.plan(model, KDNAConfig(depthwise=True, stage_depth=0)).families[0].children) == 2


def test_functional_conv_sites_are_found_and_left_with_a_reason_naming_the_fix():
    """F.conv2d calls on stored parameters have no module to put a child in (docs/design.md)."""
    plan = kdna_fx.plan(FunctionalConvNet())
    assert not plan.families
    assert [s.name for s in plan.skipped] == ["weights.0", "weights.1", "weights.2"]
    assert all("hold the kernel in an nn.Conv2d" in s.reason for s in plan.skipped)


def test_planning_is_deterministic():
    first = kdna_fx.plan(TinyResNet()).to_dict()
    for _ in range(3):
        assert kdna_fx.plan(TinyResNet()).to_dict() == first


def test_config_round_trips_through_a_plain_dict():
    config = KDNAConfig(adapter=AdapterConfig(gate_norm="layer"), by_type={nn.Conv2d: B, F.conv2d: None},
                        by_name_regex=[(r"layer1", C)], by_name={"stem.0": None}, kernel_sizes=(1, 3),
                        depthwise=True, share=False, stage_depth=2, min_family_size=3, max_children=4,
                        include="layer", exclude="head", leaf_modules=(nn.MultiheadAttention,))
    data = json.loads(json.dumps(config.to_dict()))
    assert KDNAConfig.from_dict(data) == config


def test_unknown_import_path_in_a_dict_is_a_config_error():
    with pytest.raises(kdna_fx.ConfigError, match="cannot import"):
        KDNAConfig.from_dict({"leaf_modules": ["no_such_module.Thing"]})


@pytest.mark.parametrize("cfg", [AdapterConfig(), AdapterConfig(gate=False), AdapterConfig(gate_norm="none"),
                                 AdapterConfig(spatial_scale=False, reduction=2)])
@pytest.mark.parametrize("shape", [(8, 16, 3), (5, 5, 1)])
def test_adapter_cost_is_the_adapter_parameter_count(cfg, shape):
    from kdna_fx.adapters import ChildAdapter, Gate, adapter_cost

    cin, cout, k = shape
    norm = "batch" if cfg.gate_norm == "auto" else cfg.gate_norm  # "auto" is 'batch' or 'layer': both 2 x hidden
    gate = Gate(cin, cfg.reduction, norm, cfg.gate_min_hidden) if cfg.gate else None
    adapter = ChildAdapter(parent="p", out_channels=cout, in_channels=cin, kernel_size=(k, k), gate=gate,
                           filter_scale=cfg.filter_scale, spatial_scale=cfg.spatial_scale)
    assert adapter_cost(cin, cout, (k, k), **dataclasses.asdict(cfg)) == sum(p.numel() for p in adapter.parameters())


def test_convs_whose_adapter_outweighs_their_kernel_are_not_shared():
    thin = nn.Sequential(*(nn.Conv2d(64, 64, 3, padding=1, groups=32) for _ in range(3)))  # 1,152-weight kernels
    plan = kdna_fx.plan(thin, KDNAConfig(stage_depth=0))
    assert not plan.families and all("would cost more" in s.reason for s in plan.skipped)
    assert len(kdna_fx.plan(thin, KDNAConfig(stage_depth=0, only_if_smaller=False)).families) == 1
