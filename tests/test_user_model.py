"""Issue 31: the transformed model is still the user's model. Tools users chain after kdna_fx.transform.

Each case either equals the original (a function-preserving transform: ``init="trained"`` at full rank, so every
child reproduces its own kernel) or raises a KDNAError naming the fix. Small models, 32-64 px.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

import kdna_fx
from kdna_fx import AdapterConfig, KDNAConfig
from kdna_fx.adapters import ChildAdapter

# Tier integration: whole models of torchvision, timm, smp and transformers through the transform, 2-5 s each;
# make test runs them, make test-fast leaves them out.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

PRESERVING = KDNAConfig(only_if_smaller=False, adapter=AdapterConfig(rank="full"))


def preserved(model: nn.Module, **kwargs) -> nn.Module:
    """``model`` transformed so that it computes what ``model`` computes, with children in every stage."""
    kmodel = kdna_fx.transform(model, PRESERVING, init="trained", **kwargs)
    assert kdna_fx.plan_of(kmodel).children
    return kmodel


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rtol * max(float(b.abs().max()), 1e-6))


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def x32(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_transform_returns_the_users_model_with_its_children_in_its_tree():
    model = resnet()
    kmodel = preserved(model)
    assert type(kmodel) is type(model) and isinstance(kmodel.layer1[0].conv2, ChildAdapter)
    assert close(kmodel(x32()), model(x32()))
    assert kdna_fx.datamodel.record_of(kmodel).order == "trace"
    assert kdna_fx.datamodel.record_of(preserved(model, example_inputs=(x32(),))).order == "example inputs"


# ---- hooks ---------------------------------------------------------------------------------------------------------
def test_hooks_of_every_kind_registered_before_the_transform_still_fire():
    model = resnet()
    seen: dict[str, list] = {"forward": [], "pre": [], "backward": [], "global": []}
    model.layer2.register_forward_hook(lambda m, i, o: seen["forward"].append(o.detach().clone()))
    model.layer1.register_forward_pre_hook(lambda m, i: seen["pre"].append(i[0].detach().clone()))
    model.layer3.register_full_backward_hook(lambda m, gi, go: seen["backward"].append(go[0].detach().clone()))
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen["global"].append(type(m).__name__) if isinstance(m, ChildAdapter) else None)
    try:
        kmodel = preserved(model)
        for key in seen:
            seen[key].clear()
        for m in (model, kmodel):
            m(x32().requires_grad_()).sum().backward()
    finally:
        handle.remove()
    for key in ("forward", "pre", "backward"):
        assert len(seen[key]) == 2, key
        assert close(seen[key][1], seen[key][0]), key
    assert len(seen["global"]) == len(kdna_fx.plan_of(kmodel).children)  # every child ran through module hooks


# ---- activation checkpointing --------------------------------------------------------------------------------------
class Checkpointed(nn.Module):
    """A model that checkpoints its own blocks (torch.utils.checkpoint in its forward)."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        x = checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointing_in_the_models_own_forward_still_recomputes(reentrant):
    torch.manual_seed(0)
    model = Checkpointed(reentrant).train()
    kmodel = preserved(model)
    assert isinstance(kmodel.block[2], ChildAdapter)
    runs = []
    kmodel.block.register_forward_pre_hook(lambda m, i: runs.append(1))  # recomputation may stop early
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    loss = kmodel(x).sum()
    assert len(runs) == 1
    loss.backward()
    assert len(runs) == 2  # the checkpointed block ran again in the backward pass: its activations were freed
    grad = x.grad.clone()  # the same function: the same gradient with respect to the input
    x.grad = None
    model(x).sum().backward()
    assert close(grad, x.grad, 1e-3)


def test_timm_grad_checkpointing_and_model_api_on_a_transformed_model():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    kmodel = preserved(model)
    x = x32()
    assert close(kmodel.forward_head(kmodel.forward_features(x)), model(x))
    kmodel.set_grad_checkpointing(True)
    kmodel.train()
    runs = []
    kmodel.layer2[0].register_forward_pre_hook(lambda m, i: runs.append(1))  # timm checkpoints block by block
    kmodel(x).sum().backward()
    assert len(runs) == 2  # checkpointed: recomputed in the backward pass
    kmodel.reset_classifier(5)
    assert kmodel.get_classifier().out_features == 5 and kmodel.eval()(x).shape == (2, 5)


def test_transformers_gradient_checkpointing_enable_answers_as_on_the_original():
    """transformers' conv models (ResNet, RegNet, ConvNeXt, BiT) do not support activation checkpointing: the
    transformed model keeps the model's own method, which says so exactly as the original does."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2], layer_type="basic",
                                       num_labels=3)
    model = transformers.ResNetForImageClassification(config).eval()
    kmodel = preserved(model)
    x = x32()
    assert close(kmodel(x).logits, model(x).logits)
    assert kmodel.supports_gradient_checkpointing == model.supports_gradient_checkpointing
    for m in (model, kmodel):
        with pytest.raises(ValueError, match="does not support activation checkpointing"):
            m.gradient_checkpointing_enable()


def test_smp_unet_predict_and_encoder_attributes():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2).eval()
    kmodel = preserved(model)
    x = torch.randn(1, 3, 64, 64)
    assert close(kmodel.predict(x), model.predict(x))
    assert kmodel.encoder.out_channels == model.encoder.out_channels


# ---- copies and functional views -----------------------------------------------------------------------------------
def test_an_ema_deepcopy_is_an_independent_model_whose_children_follow_its_own_parents():
    model = resnet()
    kmodel = preserved(model)
    ema = copy.deepcopy(kmodel)
    assert close(ema(x32()), kmodel(x32()))
    with torch.no_grad():  # an EMA update, then a change the original must not see
        for e, p in zip(ema.parameters(), kmodel.parameters()):
            e.lerp_(p, 0.5)
        ema.layer1[0].conv1.weight.mul_(2)
    assert ema.layer1[0].conv2.parent_kernel is ema.layer1[0].conv1.weight
    assert close(kmodel(x32()), model(x32())) and not close(ema(x32()), model(x32()))


def test_functional_call_reaches_the_children_through_their_parents():
    model = resnet()
    kmodel = preserved(model)
    params = {n: p.detach().clone() for n, p in kmodel.named_parameters()}
    assert close(torch.func.functional_call(kmodel, params, (x32(),)), model(x32()))
    params["layer1.0.conv1.weight"] = params["layer1.0.conv1.weight"] * 0  # the family's parent
    out = torch.func.functional_call(kmodel, params, (x32(),))
    assert not close(out, model(x32()))  # the children read the kernel passed in


def test_channels_last_and_a_bf16_autocast_step():
    model = resnet()
    kmodel = preserved(model)
    x = x32()
    last = copy.deepcopy(kmodel).to(memory_format=torch.channels_last)
    assert close(last(x.to(memory_format=torch.channels_last)), model(x))
    # bf16: children that copy their parent (init="copy") run through autocast as the model's own convs do
    kmodel = kdna_fx.transform(model)
    with torch.no_grad():
        reference = kmodel(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, theirs = kmodel(x).float(), model(x).float()
    own_error = float((theirs - model(x)).abs().max())  # what bf16 costs the original
    assert float((ours - reference).abs().max()) <= 2 * own_error + 1e-3
    kmodel.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kmodel(x).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in kmodel.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_data_parallel_and_jit_trace_of_the_folded_model():
    model = resnet()
    kmodel = preserved(model)
    assert close(nn.DataParallel(kmodel)(x32()), model(x32()))
    folded = kdna_fx.fold(kmodel).eval()
    traced = torch.jit.trace(folded, (x32(),))
    assert close(traced(x32(4)), model(x32(4)))


# ---- what a model keeps of its own ---------------------------------------------------------------------------------
class Legacy(nn.Module):
    """A model with a state-dict pre-hook (old checkpoints), a non-persistent buffer read outside forward, and a
    train() override that keeps its BatchNorms in eval (mmdetection's norm_eval)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(16, 16, 3, padding=1),
                                                                  nn.BatchNorm2d(16), nn.ReLU())])
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self._register_load_state_dict_pre_hook(self._rename)
        self.norm_eval = True

    @staticmethod
    def _rename(state, prefix, *args):
        for key in [k for k in state if k.startswith(prefix + "old_stem.")]:
            state[key.replace("old_stem.", "stem.")] = state.pop(key)

    def normalize(self, x):
        return x - self.mean

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x):
        return self.body(self.stem(self.normalize(x)))


def test_state_dict_pre_hooks_non_persistent_buffers_and_train_overrides_are_kept():
    torch.manual_seed(0)
    model = Legacy().eval()
    kmodel = preserved(model)
    assert isinstance(kmodel.body[3], ChildAdapter)
    old = {k.replace("stem.", "old_stem.") if k.startswith("stem.") else k: v
           for k, v in kmodel.state_dict().items()}
    kmodel.load_state_dict(old)  # the model's own pre-hook renames the old keys
    assert "mean" not in kmodel.state_dict() and torch.equal(kmodel.normalize(torch.ones(1, 3, 1, 1)),
                                                             torch.full((1, 3, 1, 1), 0.5))
    kmodel.train()
    bns = [m for m in kmodel.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)  # norm_eval: every BatchNorm stays in eval
    assert close(kmodel(x32()), model(x32()))


def test_batchnorms_kept_in_eval_stay_so_through_plan_and_transform():
    model = resnet().train()
    frozen = [m for m in model.layer1.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in frozen:
        m.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    kdna_fx.plan(model)
    assert {n: m.training for n, m in model.named_modules()} == modes  # plan changes nothing
    kmodel = kdna_fx.transform(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not any(m.training for m in kmodel.layer1.modules() if isinstance(m, nn.BatchNorm2d))
    assert kmodel.layer2[0].bn1.training


# ---- the graph form is a lowering, made when asked ------------------------------------------------------------------
def test_the_graph_form_shares_the_models_tensors_and_is_checked():
    model = resnet()
    kmodel = preserved(model)
    gm = kdna_fx.passes.lower(kmodel, (x32(),))
    assert isinstance(gm, torch.fx.GraphModule) and close(gm(x32()), model(x32()))
    assert kdna_fx.datamodel.record_of(gm).checked == "example inputs"
    assert gm.get_submodule("layer1.0.conv2") is kmodel.layer1[0].conv2  # the model's own ChildAdapter
    assert gm.get_parameter("layer1.0.conv1.weight") is kmodel.layer1[0].conv1.weight
    assert kdna_fx.datamodel.module_form(gm) is kmodel
    assert kdna_fx.report(gm, x32()).params_after == kdna_fx.report(kmodel, x32()).params_after


def test_a_model_that_reads_the_training_mode_has_no_graph_form():
    class Dropping(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.c(self.b(self.a(x)))
            return y * 2 if self.training else y

    kmodel = kdna_fx.transform(Dropping(), PRESERVING, init="trained")
    with pytest.raises(kdna_fx.KDNAError, match="reads the training mode"):
        kdna_fx.passes.lower(kmodel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = kmodel.train()(torch.randn(2, 3, 8, 8))  # the model itself keeps its mode-dependent Python
    assert out.shape == (2, 8, 8, 8)
