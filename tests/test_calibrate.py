"""kdna_fx.calibrate: label-free conversion of a trained model (issue 6, part 2)."""
from __future__ import annotations

import copy

import pytest
import torch

import kdna_fx
from kdna_fx.calibration import CalibrationError, CalibrationReport, calibrate
from kdna_fx.errors import ConfigError, KDNAError
from kdna_fx.testing import TinyResNet

CENTRES = [(4, 4), (4, 12), (12, 4), (12, 12), (8, 8)]  # class = where the bright blob sits


def blobs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 one-channel noise with a bright 4x4 blob in one of 5 places (jittered); the class is the place."""
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.5
    jitter = torch.randint(-2, 3, (n, 2), generator=g)
    for i in range(n):
        r, c = CENTRES[int(y[i])]
        r, c = r + int(jitter[i, 0]), c + int(jitter[i, 1])
        x[i, 0, max(0, r - 2):r + 2, max(0, c - 2):c + 2] += 2.0
    return x, y


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    """A TinyResNet trained for 60 steps (about 2 s): well above the 20 % of chance on held-out images."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TinyResNet(width=8, in_chans=1, num_classes=5)
    x, y = blobs(512, g)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    test_x, test_y = blobs(512, g)
    calib_x, _ = blobs(256, g)
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.8, accuracy
    return model, calib_x, test_x, test_y


def fresh_kmodel(model, seed=1):
    torch.manual_seed(seed)
    return kdna_fx.transform(model)


def agreement(kmodel, model, x):
    with torch.no_grad():
        return (kmodel.eval()(x).argmax(1) == model(x).argmax(1)).float().mean().item()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def test_bn_then_distill_recovers_the_reference_and_leaves_it_untouched(task):
    model, calib_x, test_x, test_y = task
    model.train()  # calibrate must put it in eval mode only for the duration
    before_state, before_flags = snapshot(model)
    kmodel = fresh_kmodel(model)
    kmodel.train()
    held_out_before = agreement(kmodel, model.eval(), test_x)
    model.train()
    kmodel.train()
    report = calibrate(kmodel, calib_x, reference=model, modes=("distill", "bn"), steps=100, progress=False)

    # The reference: bit-identical tensors, same train/eval flags, no gradients left on it.
    after_state, after_flags = snapshot(model)
    assert before_flags == after_flags and model.training
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert all(p.grad is None for p in model.parameters())
    assert kmodel.training  # kmodel's mode is restored too

    # Measured (seed 0): held-out agreement 0.33 -> 0.95, calibration-set agreement 0.22 -> 0.99, about 4 s.
    assert isinstance(report, CalibrationReport)
    assert [m.mode for m in report.modes] == ["bn", "distill"]  # run in the fixed order
    assert report.modes[1].steps == 100 and report.images == 256
    assert report.agreement_after > 0.9 > report.agreement_before
    assert report.modes[1].error_after < 0.6 * report.modes[1].error_before
    held_out_after = agreement(kmodel, model.eval(), test_x)
    assert held_out_before < 0.6 and held_out_after > 0.88, (held_out_before, held_out_after)
    with torch.no_grad():
        accuracy = (kmodel(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.8, accuracy

    table = str(report)
    assert "distill" in table and "agreement before" in table
    d = report.to_dict()
    assert d["images"] == 256 and [m["mode"] for m in d["modes"]] == ["bn", "distill"]


def test_same_seed_same_result(task):
    model, calib_x, _, _ = task
    states = []
    for _ in range(2):
        kmodel = fresh_kmodel(model)
        calibrate(kmodel, calib_x, reference=model, modes=("bn", "layerwise", "distill"), steps=15,
                  layerwise_steps=3, seed=3, progress=False)
        states.append(kmodel.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = fresh_kmodel(model)
    calibrate(other, calib_x, reference=model, modes="distill", steps=15, seed=4, progress=False)
    assert not all(torch.equal(states[0][k], other.state_dict()[k]) for k in states[0])


def test_layerwise_lowers_every_child_error_and_loader_data(task):
    model, calib_x, _, _ = task
    kmodel = fresh_kmodel(model)
    labels = torch.zeros(len(calib_x), dtype=torch.long)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib_x, labels), batch_size=64)
    report = calibrate(kmodel, loader, reference=model, modes=["layerwise"], layerwise_steps=20, progress=False)
    children = report.modes[0].children
    assert set(children) == set(kdna_fx.plan_of(kmodel).children)
    assert all(after < before for before, after in children.values()), children
    assert "per-child" in str(report)


def test_bn_mode_reestimates_statistics_and_restores_momentum(task):
    model, calib_x, _, _ = task
    kmodel = fresh_kmodel(model)
    bn = kmodel.get_submodule("stem.1")
    # Two equal batches: the cumulative average (momentum None) of their means is the mean over all images.
    report = calibrate(kmodel, [calib_x[:128], (calib_x[128:], None)], reference=model, modes="bn", progress=False)
    assert report.modes[0].steps == 2 and report.images == 256
    assert bn.momentum == model.stem[1].momentum and not bn.training
    with torch.no_grad():
        expect = kmodel.get_submodule("stem.0")(calib_x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expect, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(bn.running_mean, model.stem[1].running_mean)


def test_bad_inputs_raise_clear_errors(task):
    model, calib_x, _, _ = task
    kmodel = fresh_kmodel(model)
    cases = [
        (dict(data=torch.empty(0, 1, 16, 16)), "empty"),
        (dict(data=[]), "empty"),
        (dict(data=calib_x[:, 0]), "4-D"),
        (dict(data=(calib_x * 255).to(torch.uint8)), "floating point"),
        (dict(data=["not", "images"]), "not a tensor"),
        (dict(data=42), "iterable"),
        (dict(data=calib_x, modes=("bn", "finetune")), "unknown mode"),
        (dict(data=calib_x, modes=()), "unknown mode"),
        (dict(data=calib_x, batch_size=1), "batch_size"),
        (dict(data=torch.randn(8, 3, 16, 16)), "cannot run"),
        (dict(data=calib_x, reference=TinyResNet(width=8, in_chans=1, num_classes=7)), "output has shape"),
        (dict(data=calib_x, kmodel=copy.deepcopy(model)), "not a kdna_fx-transformed model.*train='all'"),
        (dict(data=calib_x, kmodel=copy.deepcopy(model), train="all", modes="layerwise"), "layerwise"),
        (dict(data=calib_x, train="everything"), "train must be one of"),
        (dict(data=calib_x, weight_lr=0.0), "weight_lr"),
        (dict(data=calib_x, features=-1.0), "features must be >= 0"),
        (dict(data=calib_x, reference=kmodel), "kmodel itself"),
    ]
    for kwargs, words in cases:
        kwargs = {"kmodel": kmodel, "reference": model, "progress": False, **kwargs}
        with pytest.raises(KDNAError, match=words):
            calibrate(kwargs.pop("kmodel"), kwargs.pop("data"), **kwargs)
    with pytest.raises(ConfigError):
        calibrate(kmodel, calib_x, reference=model, modes="nope", progress=False)


def test_refuses_a_kmodel_that_shares_tensors_with_the_reference(task):
    model, calib_x, _, _ = task
    twin = copy.deepcopy(model)
    kmodel = kdna_fx.transform(twin, inplace=True)
    state, _ = snapshot(twin)
    with pytest.raises(CalibrationError, match="inplace=True"):
        calibrate(kmodel, calib_x, reference=twin, progress=False)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in state.items())


def test_runs_on_cuda_when_there_is_one(task):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, calib_x, _, _ = task
    reference = copy.deepcopy(model).cuda()
    kmodel = fresh_kmodel(reference)
    report = calibrate(kmodel, calib_x, reference=reference, steps=20, progress=False)  # data stays on the CPU
    assert report.agreement_after > report.agreement_before


def test_train_all_distills_a_student_that_was_not_transformed(task):
    """The like-for-like baseline: a smaller plain net distilled with the same data, steps and loss."""
    model, calib_x, test_x, _ = task
    torch.manual_seed(3)
    student = TinyResNet(width=4, in_chans=1, num_classes=5)
    before_state, _ = snapshot(model)
    held_out_before = agreement(student, model, test_x)
    report = calibrate(student, calib_x, reference=model, train="all", steps=150, lr=3e-3, weight_lr=3e-3,
                       progress=False)
    assert report.agreement_after > report.agreement_before
    assert agreement(student, model, test_x) > max(0.6, held_out_before + 0.2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())


@pytest.mark.parametrize("train, parents_move, others_move", [("adapters", False, False), ("parents", True, False),
                                                             ("all", True, True)])
def test_train_chooses_what_distillation_changes(task, train, parents_move, others_move):
    model, calib_x, _, _ = task
    kmodel = fresh_kmodel(model)
    plan = kdna_fx.plan_of(kmodel)
    parents = {f.parent for f in plan.families}
    before = {k: v.clone() for k, v in kmodel.named_parameters()}
    calibrate(kmodel, calib_x, reference=model, modes="distill", train=train, steps=5, progress=False)
    after = dict(kmodel.named_parameters())
    moved = {k for k, v in before.items() if not torch.equal(v, after[k])}
    parent_keys = {f"{p}.weight" for p in parents}
    assert parent_keys <= set(before)
    assert bool(moved & parent_keys) == parents_move
    assert ("head.weight" in moved) == others_move
    assert any("filter_scale" in k for k in moved)  # adapters train in every choice


def test_features_match_the_norm_outputs_found_in_both_models(task):
    """features > 0 adds a per-layer loss on the norms at the same path; a student without them still runs."""
    from kdna_fx.calibration import _Taps

    model, calib_x, test_x, _ = task
    kmodel = fresh_kmodel(model)
    taps = _Taps(kmodel, model)
    try:
        assert "layer1.0.bn2" in taps.names and "stem.1" in taps.names
        with torch.no_grad():
            kmodel.eval()(calib_x[:4])
            model(calib_x[:4])
        assert taps.loss() > 0
    finally:
        taps.remove()
    assert not kmodel.get_submodule("layer1.0.bn2")._forward_hooks
    report = calibrate(kmodel, calib_x, reference=model, features=1.0, steps=60, progress=False)
    assert report.agreement_after > report.agreement_before
    assert report.modes[-1].error_after < report.modes[0].error_before
    student = TinyResNet(width=4, in_chans=1, num_classes=5)  # every tap differs in shape: outputs only
    calibrate(student, calib_x, reference=model, train="all", features=1.0, steps=3, progress=False)
