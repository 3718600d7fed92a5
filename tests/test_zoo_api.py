"""Every public call works on every zoo model: the reference topologies are transformed models like any other."""
from __future__ import annotations

import pytest
import torch

import kdna_fx
import kdna_fx.models as zoo
from kdna_fx.testing import randomize_adapters

NAMES = zoo.list_models("*.kdna")


def build(name: str, **extra) -> torch.nn.Module:
    options = dict(num_classes=10, in_chans=1, small_stem=True, **extra)
    if "width" in zoo.model_options(name):
        options["width"] = 0.25
    torch.manual_seed(0)
    return zoo.create_model(name, **options)


# Tier integration: make test-fast leaves it out (compile, export and full-size equality checks of every zoo model).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("name", NAMES)
def test_report_plan_and_fold(name):
    model = build(name)
    randomize_adapters(model)
    model.eval()
    x = torch.randn(3, 1, 20, 20)
    report = kdna_fx.report(model, x)
    plan = kdna_fx.plan_of(model)
    assert plan.families and report.families == plan.to_dict()["families"]
    assert report.params_after == sum(p.numel() for p in model.parameters())
    # The plain network the plan was applied to had one kernel per child more.
    removed = sum(plan.sites[c].out_channels * plan.sites[c].in_channels // plan.sites[c].groups
                  * plan.sites[c].kernel_size[0] * plan.sites[c].kernel_size[1] for c in plan.children)
    added = sum(p.numel() for _, p in kdna_fx.adapters.adapter_parameters(model))
    assert report.params_before == report.params_after + removed - added
    folded = kdna_fx.fold(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_into_a_fresh_zoo_model(name, tmp_path):
    model = build(name, gate_norm="layer")
    randomize_adapters(model)
    model.eval()
    path = tmp_path / f"{name}.safetensors"
    kdna_fx.save(model, path)
    loaded = kdna_fx.load(path, build(name, gate_norm="layer")).eval()
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert kdna_fx.plan_of(loaded).to_dict() == kdna_fx.plan_of(model).to_dict()


def test_load_into_a_zoo_model_with_another_plan_names_the_difference(tmp_path):
    path = tmp_path / "r18.safetensors"
    kdna_fx.save(build("kdna_resnet18"), path)
    with pytest.raises(kdna_fx.StateError, match="families differ"):
        kdna_fx.load(path, zoo.create_model("replace_resnet18", num_classes=10, in_chans=1, small_stem=True,
                                            width=0.25))


@pytest.mark.parametrize("name", NAMES)
def test_as_function(name):
    model = build(name).eval()
    randomize_adapters(model)
    fn = kdna_fx.as_function(model)
    assert set(fn.parents) == {kdna_fx.plan_of(model).parent_weight(f) for f in kdna_fx.plan_of(model).families}
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(fn(fn.parents, fn.params, fn.buffers, x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_its_graph_form_traces_in_train_and_eval_mode(name):
    model = build(name)
    x = torch.randn(2, 1, 20, 20)
    for train in (True, False):
        model.train(train)
        traced = kdna_fx.passes.lower(model, (x,))
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(traced(x), expected)


# resnet18.kdna checks the same (no recompile across batch sizes) in 4 s; the others take 4-12 s each: make test-all.
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] * (n != "resnet18.kdna")) for n in NAMES])
def test_compile_does_not_recompile_across_batch_sizes(name):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = build(name).eval()
    counter = CompileCounter()  # dynamo's captured graphs, run as they are: what recompiles is dynamo's guards
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    with torch.no_grad():
        for batch in (2, 3, 5):
            x = torch.randn(batch, 1, 20, 20)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
            frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == [frames[0]] * 3, f"recompiled: frames compiled after each call {frames}"


# resnet18.kdna and mobilenet_v2.kdna check the capture here, bench/export_check.py every zoo name at 224 px; the
# others (2-3 s each) run in make test-all.
EXPORTED = ("resnet18.kdna", "mobilenet_v2.kdna")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] * (n not in EXPORTED)) for n in NAMES])
def test_torch_export_with_a_dynamic_batch(name):
    model = build(name).eval()
    randomize_adapters(model)
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(model, (torch.randn(2, 1, 20, 20),), dynamic_shapes=({0: batch},))
    for n in (2, 7):
        x = torch.randn(n, 1, 20, 20)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)
