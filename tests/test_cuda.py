"""The library on a CUDA device (skipped without one; bench/gpu_check.py runs them first on a lent GPU): transform,
fold, compile in eval and train (gradients checked against eager float64), calibrate, a `kdna train` step with
bf16 autocast and channels_last, and save/load across devices."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch.utils.data import TensorDataset

import kdna_fx
from kdna_fx import AdapterConfig, KDNAConfig
from kdna_fx.testing import TinyResNet, check_compiled_gradients, randomize_adapters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def _kmodel(rewrite: str = "auto") -> torch.nn.Module:
    torch.manual_seed(0)
    kmodel = kdna_fx.transform(torchvision.models.resnet18(num_classes=10), KDNAConfig(rewrite=rewrite))
    randomize_adapters(kmodel)
    return kmodel.to(CUDA)


@pytest.mark.parametrize("rewrite", ["graph", "swap"])
def test_transform_and_fold_on_cuda_match_the_cpu(rewrite):
    kmodel = _kmodel(rewrite).eval()
    x = torch.randn(4, 3, 64, 64)
    cpu = kmodel.to("cpu")(x)
    kmodel.to(CUDA)
    with torch.no_grad():
        torch.testing.assert_close(kmodel(x.to(CUDA)).cpu(), cpu, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(kdna_fx.fold(kmodel)(x.to(CUDA)).cpu(), cpu, rtol=1e-3, atol=1e-3)


def test_compile_in_eval_matches_eager():
    kmodel = _kmodel().eval()
    x = torch.randn(8, 3, 64, 64, device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(kmodel)(x), kmodel(x), rtol=1e-3, atol=1e-3)


def test_compiled_training_gradients_match_eager_float64():
    kmodel = _kmodel().train()
    result = check_compiled_gradients(kmodel, (torch.randn(8, 3, 64, 64, device=CUDA),), backend="inductor")
    assert result.ok, str(result)


def test_calibrate_on_cuda():
    torch.manual_seed(0)
    original = TinyResNet(width=8).to(CUDA).eval()
    kmodel = kdna_fx.transform(original, KDNAConfig(adapter=AdapterConfig(rank=2)), init="trained")
    report = kdna_fx.calibrate(kmodel, torch.randn(64, 3, 16, 16, device=CUDA),
                               kdna_fx.CalibrationConfig(steps=10, batch_size=16, progress=False), reference=original)
    assert report.modes and next(kmodel.parameters()).device.type == "cuda"


def test_a_training_step_with_bf16_autocast_and_channels_last(tmp_path):
    from kdna_fx.train import TrainConfig, train

    kmodel = kdna_fx.transform(TinyResNet(width=8, num_classes=5))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 5, (32,), generator=g))
    config = TrainConfig(epochs=1, batch_size=16, lr=0.05, warmup_epochs=0, device="cuda", amp="bf16",
                         channels_last=True, progress=False, compile=True, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kdna_fx.CompiledGradientWarning)  # reported by the check itself
        result = train(kmodel, data, None, config, str(tmp_path / "run"))
    assert result["history"] and all(torch.isfinite(p).all() for p in kmodel.parameters())


def test_save_on_cuda_load_on_cpu_and_back(tmp_path):
    kmodel = _kmodel().eval()
    kdna_fx.save(kmodel, tmp_path / "m.safetensors")
    loaded = kdna_fx.load(tmp_path / "m.safetensors", torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = kmodel(x.to(CUDA)).cpu()
        torch.testing.assert_close(loaded(x), expected, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(loaded.to(CUDA)(x.to(CUDA)).cpu(), expected, rtol=1e-3, atol=1e-3)
