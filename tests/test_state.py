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
