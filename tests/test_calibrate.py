"""kdna_fx.calibrate: label-free conversion of a trained model (issue 6, part 2)."""
from __future__ import annotations

import copy

import pytest
import torch

import kdna_fx
from kdna_fx.calibration import CalibrationConfig, CalibrationError, CalibrationReport, calibrate, gram_loss
from kdna_fx.data import image_batches
from kdna_fx.errors import ConfigError, DataError, KDNAError, KDNATypeError
from kdna_fx.utils import device_dtype
from kdna_fx.testing import TinyResNet, blob_task

# Tier integration: make test-fast leaves it out (calibration runs).
# One xdist worker runs the whole file (make test: -n 2 --dist loadgroup): its tests share a cached build.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("test_calibrate")]


@pytest.fixture(scope="module")
def task():
    """A TinyResNet trained for 60 steps (about 2 s): well above the 20 % of chance on held-out images."""
    model, calib_x, test_x, test_y = blob_task()
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
    report = calibrate(kmodel, calib_x, CalibrationConfig(modes=("distill", "bn"), steps=100, progress=False),
                       reference=model)

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
        calibrate(kmodel, calib_x, CalibrationConfig(modes=("bn", "layerwise", "distill"), steps=15, layerwise_steps=3,
                                                     seed=3, progress=False), reference=model)
        states.append(kmodel.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = fresh_kmodel(model)
    calibrate(other, calib_x, CalibrationConfig(modes="distill", steps=15, seed=4, progress=False), reference=model)
    assert not all(torch.equal(states[0][k], other.state_dict()[k]) for k in states[0])


def test_layerwise_lowers_every_child_error_and_loader_data(task):
    model, calib_x, _, _ = task
    kmodel = fresh_kmodel(model)
    labels = torch.zeros(len(calib_x), dtype=torch.long)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib_x, labels), batch_size=64)
    report = calibrate(kmodel, loader, CalibrationConfig(modes=["layerwise"], layerwise_steps=20, progress=False),
                       reference=model)
    children = report.modes[0].children
    assert set(children) == set(kdna_fx.plan_of(kmodel).children)
    assert all(after < before for before, after in children.values()), children
    assert "per-child" in str(report)


def test_bn_mode_reestimates_statistics_and_restores_momentum(task):
    model, calib_x, _, _ = task
    kmodel = fresh_kmodel(model)
    bn = kmodel.get_submodule("stem.1")
    # Two equal batches: the cumulative average (momentum None) of their means is the mean over all images.
    report = calibrate(kmodel, [calib_x[:128], (calib_x[128:], None)], CalibrationConfig(modes="bn", progress=False),
                       reference=model)
    assert report.modes[0].steps == 2 and report.images == 256
    assert bn.momentum == model.stem[1].momentum and not bn.training
    with torch.no_grad():
        expect = kmodel.get_submodule("stem.0")(calib_x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expect, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(bn.running_mean, model.stem[1].running_mean)


def test_bad_inputs_raise_clear_errors(task):
    model, calib_x, _, _ = task
    kmodel = fresh_kmodel(model)
    quiet = CalibrationConfig(progress=False)
    cases = [  # (call arguments, the words of the error)
        (dict(data=torch.empty(0, 1, 16, 16)), "empty"),
        (dict(data=[]), "empty"),
        (dict(data=calib_x[:, 0]), "4-D"),
        (dict(data=(calib_x * 255).to(torch.uint8)), "floating point"),
        (dict(data=["not", "images"]), "not a tensor"),
        (dict(data=42), "iterable"),
        (dict(data=torch.randn(8, 3, 16, 16)), "cannot run"),
        (dict(data=calib_x, reference=TinyResNet(width=8, in_chans=1, num_classes=7)), "output has shape"),
        (dict(data=calib_x, kmodel=copy.deepcopy(model)), "not a kdna_fx-transformed model.*train='all'"),
        (dict(data=calib_x, kmodel=copy.deepcopy(model), config=quiet.replace(train="all", modes="layerwise")),
         "layerwise"),
        (dict(data=calib_x, reference=kmodel), "kmodel itself"),
        (dict(data=calib_x, config={"steps": 3}), "must be a kdna_fx.CalibrationConfig"),
    ]
    for kwargs, words in cases:
        kwargs = {"kmodel": kmodel, "reference": model, "config": quiet, **kwargs}
        with pytest.raises(KDNAError, match=words):
            calibrate(kwargs.pop("kmodel"), kwargs.pop("data"), kwargs.pop("config"), **kwargs)
    with pytest.raises(KDNATypeError):
        calibrate(kmodel, calib_x, {"steps": 3}, reference=model)


@pytest.mark.parametrize("data, words", [
    (torch.empty(0, 1, 16, 16), "empty"), (torch.randn(8, 16, 16), "4-D.*unsqueeze"),
    (torch.zeros(8, 1, 16, 16, dtype=torch.uint8), "floating point.*x.float"), ([{"x": 1}], "item #0 is a dict"),
    (["not", "images"], "not a tensor"), (42, "iterable"), ([torch.randn(2, 1, 4, 4), torch.randn(3, 4, 4)], "#1"),
])
def test_the_data_rooms_feeder_holds_calibrations_checks(data, words):
    """One feeder: calibrate's checks live in kdna_fx.data (strict), which raises DataError; calibrate says
    CalibrationError with the same words (test_bad_inputs_raise_clear_errors)."""
    with pytest.raises(DataError, match=words):
        stream, _ = image_batches(data, None, 4, None, strict=True)
        list(stream)


def test_the_strict_feeder_keeps_the_data_as_given():
    x = torch.randn(10, 1, 4, 4)
    in_order = list(image_batches(x, None, 4, None, strict=True)[0])
    assert [len(b) for b in in_order] == [4, 4, 2] and torch.equal(torch.cat(in_order), x)  # no generator: in order
    shuffled = torch.cat(list(image_batches(x, None, 4, torch.Generator().manual_seed(0), strict=True)[0]))
    assert not torch.equal(shuffled, x) and torch.equal(shuffled.sort(0).values, x.sort(0).values)
    loader = [(x[:3], torch.zeros(3)), (x[3:],)]  # a list is an iterable of batches, not a data set to draw from
    assert [len(b) for b in image_batches(loader, None, 4, None, strict=True)[0]] == [3, 7]


def test_device_dtype_reads_the_first_floating_tensor_buffers_included():
    class Buffers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))
            self.register_buffer("scale", torch.ones(3, dtype=torch.float64))

    assert device_dtype(Buffers()) == (torch.device("cpu"), torch.float64)
    assert device_dtype(torch.nn.ReLU()) == (torch.device("cpu"), None)
    assert device_dtype(torch.nn.Conv2d(1, 1, 1).half())[1] == torch.float16


@pytest.mark.parametrize("fields, words", [
    (dict(modes=("bn", "finetune")), "unknown mode"), (dict(modes=()), "unknown mode"),
    (dict(batch_size=1), "batch_size"), (dict(train="everything"), "train must be one of"),
    (dict(weight_lr=0.0), "weight_lr"), (dict(features=-1.0), "features must be >= 0"),
    (dict(layer_loss="cosine"), "layer_loss must be one of"), (dict(norms="frozen"), "norms must be"),
    (dict(steps=-1), "steps must be an int"), (dict(steps=2.5), "steps must be an int"),
])
def test_config_refuses_bad_fields(fields, words):
    with pytest.raises(ConfigError, match=words):
        CalibrationConfig(**fields)
    with pytest.raises(ConfigError, match=words):
        CalibrationConfig().replace(**fields)  # replace validates too


def test_config_defaults_replace_and_round_trip():
    config = CalibrationConfig()
    assert config.modes == ("bn", "distill") and config.train == "parents" and config.layer_loss == "auto"
    assert CalibrationConfig(modes="bn").modes == ("bn",)  # one mode as a string
    changed = config.replace(steps=7, modes=["distill"])
    assert changed.steps == 7 and changed.modes == ("distill",) and config.steps == 300  # a copy
    assert CalibrationConfig.from_dict(changed.to_dict()) == changed
    with pytest.raises(ConfigError, match="no field"):
        config.replace(stepz=7)


def test_refuses_a_kmodel_that_shares_tensors_with_the_reference(task):
    model, calib_x, _, _ = task
    twin = copy.deepcopy(model)
    kmodel = kdna_fx.transform(twin, inplace=True)
    state, _ = snapshot(twin)
    with pytest.raises(CalibrationError, match="inplace=True"):
        calibrate(kmodel, calib_x, CalibrationConfig(progress=False), reference=twin)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in state.items())


def test_runs_on_cuda_when_there_is_one(task):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, calib_x, _, _ = task
    reference = copy.deepcopy(model).cuda()
    kmodel = fresh_kmodel(reference)
    report = calibrate(kmodel, calib_x, CalibrationConfig(steps=20, progress=False),
                       reference=reference)  # data stays on the CPU
    assert report.agreement_after > report.agreement_before


def test_train_all_distills_a_student_that_was_not_transformed(task):
    """The like-for-like baseline: a smaller plain net distilled with the same data, steps and loss."""
    model, calib_x, test_x, _ = task
    torch.manual_seed(3)
    student = TinyResNet(width=4, in_chans=1, num_classes=5)
    before_state, _ = snapshot(model)
    held_out_before = agreement(student, model, test_x)
    report = calibrate(student, calib_x, CalibrationConfig(train="all", steps=150, lr=3e-3, weight_lr=3e-3,
                                                           progress=False), reference=model)
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
    calibrate(kmodel, calib_x, CalibrationConfig(modes="distill", train=train, steps=5, progress=False), reference=model)
    after = dict(kmodel.named_parameters())
    moved = {k for k, v in before.items() if not torch.equal(v, after[k])}
    parent_keys = {f"{p}.weight" for p in parents}
    assert parent_keys <= set(before)
    assert bool(moved & parent_keys) == parents_move
    assert ("head.weight" in moved) == others_move
    assert any("filter_scale" in k for k in moved)  # adapters train in every choice


def test_features_match_the_norm_outputs_found_in_both_models(task):
    """features > 0 adds a per-layer loss on the norms at the same path (so it changes the result), and no hook
    is left behind."""
    model, calib_x, _, _ = task
    states = {}
    for features in (0.0, 1.0):
        kmodel = fresh_kmodel(model)
        report = calibrate(kmodel, calib_x, CalibrationConfig(features=features, steps=60, progress=False),
                           reference=model)
        assert report.agreement_after > report.agreement_before
        assert report.modes[-1].error_after < report.modes[0].error_before
        assert not any(m._forward_hooks for m in kmodel.modules()) and not any(m._forward_hooks
                                                                                for m in model.modules())
        states[features] = kmodel.state_dict()
    assert not all(torch.equal(states[0.0][k], states[1.0][k]) for k in states[0.0])


def test_gram_loss_ignores_width_and_channel_order_but_sees_structure(dtype):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(16, 8, 4, 4, generator=g, dtype=dtype)
    kept = r[:, torch.tensor([5, 0, 3])]  # a pruned layer: 3 of the 8 channels, in another order
    assert float(gram_loss(r, r)) == pytest.approx(0.0, abs=1e-6)
    assert float(gram_loss(r[:, torch.randperm(8, generator=g)] * 3.0, r)) == pytest.approx(0.0, abs=1e-5)
    other = torch.randn(16, 3, 4, 4, generator=g, dtype=dtype)
    assert 0 < float(gram_loss(kept, r)) < float(gram_loss(other, r)) <= 4.0


def test_pruned_students_get_the_per_layer_loss_where_shapes_differ(task):
    """layer_loss "auto": the Gram loss where a layer is narrower than the reference's; "mse" skips such layers
    (the former logits-only treatment of a pruned student), so with every layer narrower it equals features=0.
    On a transformed model, whose layers keep their shapes, "auto" is the MSE."""
    model, calib_x, _, _ = task

    def distilled(student, **fields):
        student = copy.deepcopy(student)
        report = calibrate(student, calib_x, CalibrationConfig(steps=10, progress=False, **fields), reference=model)
        return student.state_dict(), report

    torch.manual_seed(3)
    narrow = TinyResNet(width=4, in_chans=1, num_classes=5)  # every norm narrower than the reference's
    everything = dict(train="all", lr=3e-3, weight_lr=3e-3)
    auto, report = distilled(narrow, **everything)
    mse, _ = distilled(narrow, layer_loss="mse", **everything)
    logits, _ = distilled(narrow, features=0.0, **everything)
    assert report.config.layer_loss == "auto" and report.to_dict()["config"]["layer_loss"] == "auto"
    assert all(torch.equal(mse[k], logits[k]) for k in mse)
    assert not all(torch.equal(auto[k], mse[k]) for k in auto)
    kmodel = fresh_kmodel(model)
    same, _ = distilled(kmodel)
    as_mse, _ = distilled(kmodel, layer_loss="mse")
    as_gram, _ = distilled(kmodel, layer_loss="gram")
    assert all(torch.equal(same[k], as_mse[k]) for k in same)
    assert not all(torch.equal(same[k], as_gram[k]) for k in same)
