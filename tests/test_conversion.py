"""Converting a trained model: init="trained", relaxed (low-rank) children, centroid parents, load_original."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdna_fx
from kdna_fx import AdapterConfig, KDNAConfig
from kdna_fx.testing import TinyResNet, blob_task

# Tier integration: make test-fast leaves it out (converts and calibrates trained models).
# One xdist worker runs the whole file (make test: -n 2 --dist loadgroup): its tests share a cached build.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_conversion")]


def _trained_like(seed: int = 0) -> TinyResNet:
    """A TinyResNet with distinct random kernels and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = TinyResNet(width=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


FULL_RANK = 4 * 9  # C_in * k * k of every 3x3 conv of layer1 (8 * 9 in layer2 is more than its C_out 8)


def test_trained_init_gates_are_the_exact_identity_and_still_train(dtype):
    kmodel = kdna_fx.transform(_trained_like(), init="trained")
    gates = [m for m in kmodel.modules() if isinstance(m, kdna_fx.adapters.Gate)]
    assert gates
    kmodel.train()
    for gate in gates:
        a = gate(torch.randn(3, gate.fc1.in_features, 5, 5) * 3)
        assert torch.allclose(a, torch.ones_like(a), atol=1e-6, rtol=0)
        (a * torch.randn_like(a)).sum().backward()
        assert gate.fc2.bias.grad is not None and gate.fc2.bias.grad.abs().sum() > 0


def test_trained_init_of_identical_kernels_reproduces_the_model(dtype, tol):
    model = _trained_like()
    with torch.no_grad():  # every conv of a family holds the same kernel
        for layer in (model.layer1, model.layer2):
            convs = [m for n, m in layer.named_modules() if n.endswith(("conv1", "conv2"))
                     and m.weight.shape == layer[-1].conv2.weight.shape]
            for conv in convs:
                conv.weight.copy_(convs[0].weight)
    kmodel = kdna_fx.transform(model, init="trained").eval()
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(kmodel(x), model(x), **tol)


@pytest.mark.parametrize("parent", ["first", "centroid"])
def test_full_rank_residual_reproduces_any_kernel_and_folds_exactly(dtype, tol, parent):
    model = _trained_like()
    config = KDNAConfig(adapter=AdapterConfig(rank=FULL_RANK * 2), parent=parent, only_if_smaller=False)
    kmodel = kdna_fx.transform(model, config, init="trained").eval()
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(kmodel(x), model(x), **tol)
    torch.testing.assert_close(kdna_fx.fold(kmodel)(x), model(x), **tol)
    low = kdna_fx.transform(model, KDNAConfig(adapter=AdapterConfig(rank=2), parent=parent,
                                              only_if_smaller=False), init="trained").eval()
    assert (low(x) - model(x)).abs().max() > 1e-3  # rank 2 of 36 cannot reproduce distinct kernels


@settings(max_examples=40)
@given(c_out=st.integers(1, 24), fan_in=st.integers(1, 24), true_rank=st.integers(0, 24), rank=st.integers(1, 30),
       seed=st.integers(0, 2**16))
def test_low_rank_factors_are_the_balanced_truncated_svd(c_out, fan_in, true_rank, rank, seed):
    """B A is a best rank-r approximation (the SVD's error, Eckart-Young), B^T B = A A^T (the singular values
    split evenly), wide and tall residuals alike, rank-deficient and zero ones included; at full rank, exact."""
    from passes.initialization import low_rank_factors

    g = torch.Generator().manual_seed(seed)
    k = min(true_rank, c_out, fan_in)
    m = torch.randn(c_out, k, generator=g, dtype=torch.float64) @ torch.randn(k, fan_in, generator=g,
                                                                                dtype=torch.float64)
    b, a = low_rank_factors(m, rank)
    assert b.shape == (c_out, rank) and a.shape == (rank, fan_in) and b.dtype == a.dtype == torch.float64
    s = torch.linalg.svdvals(m)
    best = s[rank:].square().sum().sqrt()  # the smallest error any rank-r matrix can have
    scale = max(1.0, s[0].item()) ** 2
    assert (m - b @ a).norm() <= best + 1e-9 * scale
    assert torch.allclose(b.T @ b, a @ a.T, atol=1e-6 * scale)
    if rank >= min(c_out, fan_in):
        torch.testing.assert_close(b @ a, m, rtol=0, atol=1e-12 * scale)


def test_centroid_families_make_every_member_a_child_and_count_the_kernel_once():
    model = _trained_like()
    kmodel = kdna_fx.transform(model, KDNAConfig(parent="centroid"))
    plan = kdna_fx.plan_of(kmodel)
    for family in plan.families:
        members = [kmodel.get_submodule(m) for m in family.members]
        assert all(isinstance(m, kdna_fx.adapters.ChildAdapter) for m in members)
        shared = kmodel.get_parameter(plan.parent_weight(family))
        expected = torch.stack([model.get_submodule(m).weight for m in family.members]).mean(0)
        torch.testing.assert_close(shared, expected)
        assert sum(m.held_weight is not None for m in members) == 1
    first = kdna_fx.transform(model)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    adapter_of_parents = sum(sum(p.numel() for p in kmodel.get_submodule(f.parent).parameters()) -
                             kmodel.get_submodule(f.parent).weight.numel() for f in plan.families)
    assert n(kmodel) == n(first) + adapter_of_parents
    x = torch.randn(2, 3, 12, 12)
    assert kmodel.eval()(x).shape == model(x).shape


def test_load_original_round_trip(dtype, tol):
    trained = _trained_like(seed=1)
    config = KDNAConfig(adapter=AdapterConfig(rank=FULL_RANK * 2), only_if_smaller=False)
    kmodel = kdna_fx.transform(_trained_like(seed=2), config, init="trained")
    kdna_fx.load_original(kmodel, trained.state_dict())
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(kmodel.eval()(x), trained(x), **tol)
    bad = dict(trained.state_dict())
    bad.pop("head.weight")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(kdna_fx.StateError, match=r"1 missing \(e.g. \['head.weight'\]\), 1 unexpected"):
        kdna_fx.load_original(kmodel, bad)


def test_trained_init_saves_and_reloads(tmp_path, dtype, tol):
    kmodel = kdna_fx.transform(_trained_like(), KDNAConfig(adapter=AdapterConfig(rank=3)), init="trained")
    kdna_fx.save(kmodel, tmp_path / "k.safetensors")
    loaded = kdna_fx.load(tmp_path / "k.safetensors", TinyResNet(width=4))
    assert all(g.scale == 2.0 for g in loaded.modules() if isinstance(g, kdna_fx.adapters.Gate))
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(loaded.eval()(x), kmodel.eval()(x), **tol)


def test_rank_counts_in_only_if_smaller_and_bad_values_are_refused():
    with pytest.raises(kdna_fx.ConfigError, match="rank"):
        AdapterConfig(rank=-1)
    with pytest.raises(kdna_fx.ConfigError, match="parent"):
        KDNAConfig(parent="mean")
    with pytest.raises(kdna_fx.ConfigError, match="init"):
        kdna_fx.transform(_trained_like(), init="pretrained")
    huge = kdna_fx.plan(_trained_like(), KDNAConfig(adapter=AdapterConfig(rank=64)))
    assert not huge.families and any("would cost more" in s.reason for s in huge.skipped)


def test_transform_composes_with_structured_pruning(dtype, tol):
    """Prune then share: a Torch-Pruning-pruned model transforms, with fewer parameters than either alone."""
    import torch_pruning as tp

    model = _trained_like()
    example = torch.randn(1, 3, 12, 12)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.25, ignored_layers=[model.head])
    pruner.step()
    pruned = sum(p.numel() for p in model.parameters())
    kmodel = kdna_fx.transform(model, init="trained").eval()
    assert kdna_fx.plan_of(kmodel).families
    assert sum(p.numel() for p in kmodel.parameters()) < pruned < sum(p.numel() for p in _trained_like().parameters())
    identical = kdna_fx.transform(model, KDNAConfig(adapter=AdapterConfig(rank=64), only_if_smaller=False),
                                  init="trained").eval()
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(identical(x), model.eval()(x), **tol)  # full-rank residuals: the pruned model


# ------------------------------------------------------------------------------ kdna_fx.convert: the library


@pytest.fixture(scope="module")
def blob():
    with torch.random.fork_rng():
        return blob_task()


def test_convert_transforms_calibrates_and_scores_every_stage(blob):
    from kdna_fx.train import TrainConfig

    model, calib_x, test_x, test_y = blob
    state = {k: v.clone() for k, v in model.state_dict().items()}
    labelled = torch.utils.data.TensorDataset(test_x[:128], test_y[:128])
    result = kdna_fx.convert(model, calib_x, calibration=kdna_fx.CalibrationConfig(steps=40, progress=False),
                             finetune=labelled,
                             finetune_config=TrainConfig(epochs=1, batch_size=32, lr=0.01, warmup_epochs=0,
                                                         amp="none", progress=False, limit_steps=2),
                             evaluate={"held": [(test_x, test_y)]})
    assert list(result.stages) == ["converted", "calibrated", "fine-tuned"]
    held = {stage: v["held"] for stage, v in result.stages.items()}
    assert held["calibrated"]["agreement"] > held["converted"]["agreement"]
    assert 0 <= held["fine-tuned"]["top1"] <= 100 and result.stages["calibrated"]["seconds"] > 0
    assert result.params["converted"] < result.params["original"]
    assert kdna_fx.plan_of(result.model).families and result.calibration.modes[-1].steps == 40
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the original is only read
    d = result.to_dict()
    assert d["calibration"]["config"]["steps"] == 40 and "model" not in d


def test_convert_bad_inputs_are_clear(blob):
    model, calib_x, _, _ = blob
    with pytest.raises(kdna_fx.ConfigError, match="at least 2 images"):
        kdna_fx.convert(model, calib_x[0])
    with pytest.raises(kdna_fx.KDNATypeError, match="original"):
        kdna_fx.convert("resnet18", calib_x)
