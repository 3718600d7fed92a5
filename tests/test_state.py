"""State: strict round trips, nothing lost in tracing, safetensors save/load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kdna_fx
from kdna_fx.testing import TinyResNet, randomize_adapters


def test_state_dict_round_trip_is_strict(dtype, tol):
    torch.manual_seed(0)
    kmodel = kdna_fx.transform(TinyResNet())
    randomize_adapters(kmodel)
    kmodel(torch.randn(4, 3, 16, 16))  # move BN statistics away from their initial values
    fresh = kdna_fx.transform(TinyResNet())
    fresh.load_state_dict(kmodel.state_dict(), strict=True)
    kmodel.eval(), fresh.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh(x), kmodel(x), **tol)


def test_no_buffer_is_lost_in_tracing(dtype):
    class WithUnusedState(TinyResNet):
        def __init__(self):
            super().__init__()
            self.register_buffer("calibration", torch.arange(3.0))  # never read by forward
            self.spare = nn.BatchNorm2d(4)  # never called

    model = WithUnusedState()
    kmodel = kdna_fx.transform(model)
    removed = {f"{c}.weight" for c in kdna_fx.plan_of(kmodel).children}
    expected = set(model.state_dict()) - removed
    assert expected <= set(kmodel.state_dict())
    assert "calibration" in kmodel.state_dict() and "spare.num_batches_tracked" in kmodel.state_dict()
    assert all(k in kmodel.state_dict() for k in model.state_dict() if k.endswith("num_batches_tracked"))


def test_each_tensor_is_stored_once(dtype):
    kmodel = kdna_fx.transform(TinyResNet())
    names = dict(kmodel.named_parameters(remove_duplicate=False))
    assert len({id(p) for p in names.values()}) == len(names)


def test_save_and_load_with_safetensors(tmp_path, dtype, tol):
    torch.manual_seed(0)
    kmodel = kdna_fx.transform(TinyResNet(), kdna_fx.KDNAConfig(adapter=kdna_fx.AdapterConfig(gate_norm="layer")))
    randomize_adapters(kmodel)
    kdna_fx.save(kmodel, tmp_path / "model.safetensors")
    loaded = kdna_fx.load(tmp_path / "model.safetensors", TinyResNet())
    assert kdna_fx.datamodel.record_of(loaded).config == kdna_fx.datamodel.record_of(kmodel).config
    kmodel.eval(), loaded.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), kmodel(x), **tol)


def test_safetensors_of_the_model_itself(tmp_path):
    from safetensors.torch import load_file, save_file

    kmodel = kdna_fx.transform(TinyResNet())
    save_file({k: v.contiguous() for k, v in kmodel.state_dict().items()}, tmp_path / "raw.safetensors")
    assert set(load_file(tmp_path / "raw.safetensors")) == set(kmodel.state_dict())


def test_load_into_a_different_architecture_is_refused(tmp_path):
    kdna_fx.save(kdna_fx.transform(TinyResNet()), tmp_path / "m.safetensors")
    with pytest.raises(kdna_fx.StateError, match="does not produce the saved plan|do not fit"):
        kdna_fx.load(tmp_path / "m.safetensors", TinyResNet(width=16))


def test_load_of_a_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(kdna_fx.StateError, match="cannot read"):
        kdna_fx.load(path, TinyResNet())


def test_folded_models_are_not_saved(tmp_path):
    folded = kdna_fx.fold(kdna_fx.transform(TinyResNet()).eval())
    with pytest.raises(kdna_fx.StateError, match="unfolded"):
        kdna_fx.save(folded, tmp_path / "f.safetensors")


# ---- checkpoints that describe themselves: load(path) without a model -------------------------------------
def _round_trip(model: nn.Module, path, x: torch.Tensor) -> nn.Module:
    """save, load(path) with no model, and the loaded model's eval output equal to the saved one's, bit for bit."""
    if kdna_fx.datamodel.find_record(model) is not None:
        randomize_adapters(model)
    model.train()(torch.cat([x, x.flip(0)]))  # running statistics away from their initial values
    model.eval()
    kdna_fx.save(model, path)
    loaded = kdna_fx.load(path)
    assert type(loaded) is not type(None) and not loaded.training or loaded.eval() is loaded
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert kdna_fx.models.spec_of(loaded) == kdna_fx.models.spec_of(model)
    return loaded


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", kdna_fx.models.list_models())
def test_load_path_rebuilds_every_zoo_model(name, tmp_path):
    options = dict(num_classes=10, in_chans=1, small_stem=True)
    if "width" in kdna_fx.models.model_options(name):
        options["width"] = 0.25
    torch.manual_seed(0)
    model = kdna_fx.models.create_model(name, **options)
    _round_trip(model, tmp_path / "m.safetensors", torch.randn(2, 1, 16, 16))


@pytest.mark.parametrize("name, kwargs, config", [
    ("torchvision/resnet18", {}, None),
    ("torchvision/mobilenet_v3_small", {}, kdna_fx.KDNAConfig(kernel_sizes=(1,))),
    ("torchvision/regnet_x_400mf", {}, None),
    ("timm/resnet26d", {}, None),
    ("timm/regnetx_002", {}, kdna_fx.KDNAConfig(kernel_sizes=(1,))),
    ("timm/resnet18.replace", {"gate_norm": "layer"}, None),
])
@pytest.mark.usefixtures("one_thread")
def test_load_path_rebuilds_transformed_torchvision_and_timm_models(name, kwargs, config, tmp_path):
    torch.manual_seed(0)
    model = kdna_fx.models.create_model(name, num_classes=10, **kwargs)
    if kdna_fx.datamodel.find_record(model) is None:
        model = kdna_fx.transform(model, config)
    assert kdna_fx.plan_of(model).families
    loaded = _round_trip(model, tmp_path / "m.safetensors", torch.randn(2, 3, 32, 32))
    assert kdna_fx.plan_of(loaded).to_dict() == kdna_fx.plan_of(model).to_dict()


def test_load_path_of_a_model_with_no_builder_asks_for_the_model(tmp_path):
    kdna_fx.save(kdna_fx.transform(TinyResNet()), tmp_path / "m.safetensors")
    with pytest.raises(kdna_fx.StateError, match=r"kdna_fx.load\(path, model\)"):
        kdna_fx.load(tmp_path / "m.safetensors")
    assert kdna_fx.load(tmp_path / "m.safetensors", TinyResNet()) is not None  # as before


def test_save_needs_a_transformed_or_zoo_built_model(tmp_path):
    with pytest.raises(kdna_fx.StateError, match="neither a kdna_fx-transformed model nor built by"):
        kdna_fx.save(TinyResNet(), tmp_path / "m.safetensors")


def test_an_untransformed_file_refuses_a_transformed_model_and_fold(tmp_path):
    path = tmp_path / "plain.safetensors"
    kdna_fx.save(kdna_fx.models.create_model("resnet18", num_classes=10, width=0.25), path)
    with pytest.raises(kdna_fx.StateError, match="untransformed model"):
        kdna_fx.load(path, kdna_fx.models.create_model("resnet18.replace", num_classes=10, width=0.25))
    with pytest.raises(kdna_fx.StateError, match="nothing to fold"):
        kdna_fx.load(path, fold=True)


def test_a_builder_that_cannot_be_built_here_asks_for_the_model(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    kdna_fx.save(kdna_fx.models.create_model("resnet18", num_classes=10, width=0.25), path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    metadata["builder"] = '{"name": "timm/no_such_net", "kwargs": {}}'
    save_file(load_file(path), path, metadata=metadata)
    with pytest.raises(kdna_fx.StateError, match=r"'timm/no_such_net', which cannot be built here"):
        kdna_fx.load(path)
