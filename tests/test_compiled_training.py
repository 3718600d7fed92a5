"""Compiled training you can trust (docs/known-issues.md, docs/training.md): compiled gradients are checked against
eager float64 before `kdna train --compile` trains on them, and a backend that gets them wrong is replaced, with
one warning that names the worst parameter."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdna_fx
from kdna_fx import AdapterConfig, KDNAConfig
from kdna_fx.testing import OneFamily, check_compiled_gradients, randomize_adapters
from kdna_fx.train import TrainConfig, train
from kdna_fx.train.loop import compile_backend

# Tier integration: make test-fast leaves it out (compiles training steps with Inductor).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


def _model() -> nn.Module:
    """OneFamily transformed, adapters off zero, in train mode: every part of a child's training graph (stem
    BatchNorm, a parent and two children with LayerNorm gates, a head) in the fewest Inductor kernels. Inductor
    builds each kernel of the forward and backward in C++ (about 1 s each here); TinyResNet's two families
    double the kernels and the test's time and add nothing of ours (test_compile compiles it with aot_eager)."""
    torch.manual_seed(0)
    kmodel = kdna_fx.transform(OneFamily(), KDNAConfig(adapter=AdapterConfig(gate_norm="layer")))
    assert len(kdna_fx.plan_of(kmodel).children) == 2
    randomize_adapters(kmodel)
    return kmodel.train()


def _wrong(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """A dynamo backend that computes something slightly else: every output 1 % too large."""
    def run(*args: object) -> object:
        return [o * 1.01 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in gm(*args)]
    return run


def test_inductor_trains_a_transformed_model_as_eager_does():
    """A few compiled SGD steps with the backend the check chooses (Inductor here; on a machine where Inductor's
    gradients are wrong, its fallback), against the same steps in eager float64."""
    kmodel = _model()
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = compile_backend(kmodel, x)
    assert backend is not None
    assert (backend == "inductor") == (not any(issubclass(w.category, kdna_fx.CompiledGradientWarning)
                                              for w in caught))
    reference = copy.deepcopy(kmodel).double()
    compiled = torch.compile(kmodel, backend=backend)
    for model, run, inputs in ((kmodel, compiled, x), (reference, reference, x.double())):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(run(inputs), y).backward()
            opt.step()
    for (name, p), q in zip(kmodel.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-4, atol=1e-5, msg=name)


def test_a_backend_that_gets_gradients_wrong_is_caught_and_named():
    kmodel = _model()
    x = torch.randn(4, 3, 16, 16)
    result = check_compiled_gradients(kmodel, (x,), backend=_wrong)
    assert not result.ok and result.worst in dict(kmodel.named_parameters())
    assert result.error > 100 * result.eager_error and "DIFFERS" in str(result)
    assert check_compiled_gradients(kmodel, (x,), backend="aot_eager").ok
    # the model given to the check is untouched
    assert all(p.grad is None for p in kmodel.parameters())


def test_training_falls_back_to_a_right_backend_with_one_warning(monkeypatch):
    kmodel = _model()
    x = torch.randn(4, 3, 16, 16)
    with pytest.warns(kdna_fx.CompiledGradientWarning, match="DIFFERS.*backend='aot_eager' instead"):
        assert compile_backend(kmodel, x, backends=(_wrong, "aot_eager")) == "aot_eager"
    with pytest.warns(kdna_fx.CompiledGradientWarning, match="training eagerly instead"):
        assert compile_backend(kmodel, x, backends=(_wrong,)) is None


def test_kdna_train_compile_runs_the_check_and_uses_its_answer(monkeypatch, tmp_path):
    """train(compile=True) asks compile_backend, and trains eagerly when no backend is right."""
    import kdna_fx.train.loop as loop

    asked = []

    def no_backend(model: nn.Module, example: torch.Tensor) -> None:
        asked.append(tuple(example.shape))
        return None

    monkeypatch.setattr(loop, "compile_backend", no_backend)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled.append(k) or a[0])
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 5, (16,), generator=g))
    config = TrainConfig(epochs=1, batch_size=8, lr=0.05, warmup_epochs=0, device="cpu", amp="none", progress=False,
                         compile=True, seed=1)
    train(_model(), data, None, config, str(tmp_path / "run"))
    assert asked == [(4, 3, 16, 16)] and compiled == []
