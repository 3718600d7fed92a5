"""The zoo in timm's registry: timm.create_model builds every architecture and tag with create_model's exact
parameters, a proper pretrained_cfg, timm's train helpers, features_only backbones, smp and detection."""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import kdna_fx
import kdna_fx.models as zoo
from kdna_fx.adapters import ChildAdapter
from kdna_fx.models.timm import timm_name
from kdna_fx.peers import KWConv2d, PeerConv2d

# Tier integration: make test-fast leaves it out (the zoo through timm, smp and a torchvision detector).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
# every zoo name, with its timm name
PAIRS = [(n, timm_name(*n.split("."))) for n in zoo.list_models()]
# The peer tags go through the same timm path as plain, replace, relaxed and kdna, which stay in the default tier;
# their builds (about 0.3 s each, 40 in all) run in make test-all.
TIERED = [pytest.param(n, t, id=t, marks=[pytest.mark.slow] * (zoo.TAGS[n.split(".")[1]].peer is not None))
          for n, t in PAIRS]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small(name: str) -> dict:
    return dict(num_classes=10, **({"width": 0.25} if "width" in zoo.model_options(name) else {}))


def children(model: nn.Module) -> int:
    return sum(isinstance(m, ChildAdapter) for m in model.modules())


def test_every_architecture_and_tag_is_registered() -> None:
    assert sorted(timm.list_models("kdna_*")) == sorted(t for _, t in PAIRS)
    tags = [n.split(".")[1] for n in zoo.list_models("resnet50.*")]
    assert {"plain", "replace", "kdna", "condconv", "dyconv", "odconv"} <= set(tags)
    assert timm.list_models("kdna_resnet50*") == ["kdna_resnet50"] + sorted(
        f"kdna_resnet50_{t}" for t in tags if t != "kdna")
    assert not timm.list_models("kdna_*", pretrained=True)  # no weights are claimed


@pytest.mark.parametrize("name, tname", TIERED)
def test_timm_builds_what_create_model_builds(name: str, tname: str) -> None:
    torch.manual_seed(0)
    ours = zoo.create_model(name, in_chans=1, small_stem=True, **small(name))
    theirs = timm.create_model(tname, in_chans=1, small_stem=True, **small(name))
    assert n_params(theirs) == n_params(ours)
    signature = [[(k, v.shape) for k, v in m.state_dict().items()] for m in (theirs, ours)]
    assert signature[0] == signature[1]
    assert zoo.spec_of(theirs) == zoo.spec_of(ours)  # so kdna_fx.load(path) rebuilds a timm-made model too
    cfg = theirs.pretrained_cfg
    assert (cfg["input_size"], cfg["mean"], cfg["std"], cfg["num_classes"]) == \
        ((3, 224, 224), timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD, 1000)
    assert isinstance(theirs.get_submodule(cfg["first_conv"]), (nn.Conv2d, PeerConv2d, KWConv2d))  # a peer converts the stem
    classifier = theirs.get_submodule(cfg["classifier"])
    assert isinstance(classifier, nn.Linear) and classifier.out_features == 10 == theirs.num_classes
    again = copy.deepcopy(theirs)  # a GraphModule keeps only what torch.fx preserves
    assert again.pretrained_cfg == cfg and again.num_classes == 10


@pytest.mark.parametrize("tname, params", [("kdna_resnet50", 22_778_060), ("kdna_mobilenet_v2", 3_136_840)])
def test_full_size_reference_counts_through_timm(tname: str, params: int) -> None:
    assert n_params(timm.create_model(tname)) == params
    assert n_params(timm.create_model(tname, num_classes=100)) == n_params(zoo.create_model(tname, num_classes=100))


def test_pretrained_and_regularisers_it_lacks_are_refused_clearly() -> None:
    with pytest.raises(kdna_fx.ConfigError, match="no pretrained weights"):
        timm.create_model("kdna_resnet18", pretrained=True)
    # timm's train script passes drop_rate=0.0 (its --drop default) to every model
    model = timm.create_model("kdna_resnet18", num_classes=10, width=0.25, drop_rate=0.0, drop_path_rate=None)
    assert n_params(model) == n_params(zoo.create_model("resnet18.kdna", num_classes=10, width=0.25))
    with pytest.raises(kdna_fx.ConfigError, match="takes no drop_rate"):
        timm.create_model("kdna_resnet18", drop_rate=0.2)


def test_a_train_step_through_timms_own_helpers() -> None:
    from timm.data import create_transform, resolve_data_config
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = timm.create_model("kdna_resnet18", num_classes=5, width=0.25, gate_norm="layer")
    config = resolve_data_config({"input_size": (3, 64, 64)}, model=model)
    assert config["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and config["crop_pct"] == 0.875
    transform = create_transform(**config, is_training=True)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (80, 80, 3), dtype=np.uint8)) for i in range(4)]
    x = torch.stack([transform(im) for im in images])
    assert x.shape == (4, 3, 64, 64)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(".gate." in n for n in changed) and any(n.endswith("conv2.weight") for n in changed)


@pytest.mark.parametrize("name, tname", TIERED)
def test_features_only(name: str, tname: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(tname, features_only=True, **{k: v for k, v in small(name).items() if k == "width"})
    info = model.feature_info
    expected = [2, 4, 8, 16, 32] if not name.startswith("convnext") else [4, 8, 16, 32]
    assert info.reduction() == expected
    x = torch.randn(2, 3, 64, 64)
    features = model(x)
    assert [f.shape[1] for f in features] == info.channels() == copy.deepcopy(model).feature_info.channels()
    assert [64 // f.shape[-1] for f in features] == expected
    sum(f.mean() for f in features).backward()
    if name.endswith((".kdna", ".replace")):
        # the backbone shares its kernels as the classifier does
        assert children(model) == children(zoo.create_model(name, **small(name))) > 0
    # out_indices: timm's FeatureListNet stops after the last stage asked for (before any shared kernel here)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kdna_fx.NoEligibleConvWarning)
        early = timm.create_model(tname, features_only=True, out_indices=(1, 2),
                                  **{k: v for k, v in small(name).items() if k == "width"})
    assert [f.shape[1] for f in early(x)] == info.channels()[1:3]


def test_smp_unet_on_a_kernelDNA_encoder() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = smp.Unet("tu-kdna_resnet18", encoder_weights=None, encoder_depth=5, classes=3,
                     decoder_channels=(32, 16, 16, 8, 8))
    assert children(model) == 6  # the reference topology's children, inside the encoder
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    assert y.shape == (2, 3, 64, 64)
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    convnext = smp.Unet("tu-kdna_convnext_tiny", encoder_weights=None, classes=2, decoder_channels=(32, 16, 16, 8, 8))
    convnext(x).mean().backward()


class TimmFPN(nn.Module):
    """A torchvision detection backbone: timm features of a KernelDNA network and torchvision's FPN."""

    def __init__(self, body: nn.Module, out_channels: int = 32):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def test_faster_rcnn_on_a_kernelDNA_backbone() -> None:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    torch.manual_seed(0)
    body = timm.create_model("kdna_resnet18", features_only=True, out_indices=(1, 2, 3, 4), width=0.25,
                             gate_norm="layer")
    assert children(body) == 6
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    detector = FasterRCNN(TimmFPN(body), num_classes=3, rpn_anchor_generator=anchors, min_size=96, max_size=96)
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 20.0, 90.0, 70.0]]), "labels": torch.tensor([2])}]
    losses = detector.train()(images, targets)
    sum(losses.values()).backward()
    grads = [m.filter_scale.grad for m in body.modules() if isinstance(m, ChildAdapter)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    detections = detector.eval()(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}


def test_a_checkpoint_of_a_timm_made_model_loads_without_the_model(tmp_path) -> None:
    from kdna_fx.testing import randomize_adapters

    model = timm.create_model("kdna_mobilenet_v2", num_classes=10, width=0.25, small_stem=True)
    randomize_adapters(model)
    model.eval()
    kdna_fx.save(model, tmp_path / "m.safetensors")
    loaded = kdna_fx.load(tmp_path / "m.safetensors").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---- timm's model API (issue 31): what timm's fine-tuning code calls on a model ------------------------
API_NAMES = ["kdna_resnet18", "kdna_resnet50_plain", "kdna_mobilenet_v2_replace", "kdna_mobilenet_v2_050",
             "kdna_convnext_tiny", "kdna_convnext_tiny_relaxed", "kdna_resnet18_odconv"]


def api_model(tname: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    zoo_name = next(n for n, t in PAIRS if t == tname)
    return timm.create_model(tname, **small(zoo_name), **extra)


@pytest.mark.parametrize("tname", API_NAMES)
def test_timm_model_api_splits_forward_and_resets_the_classifier(tname: str) -> None:
    model = api_model(tname).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert features.dim() == 4 and torch.equal(model.forward_head(features), logits)
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == 10 == logits.shape[1]
    assert pooled.shape == (2, head.in_features)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.num_classes == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0)
    with torch.no_grad():
        assert isinstance(model.get_classifier(), nn.Identity) and torch.equal(model(x), pooled)
    model.reset_classifier(5)  # back from no head: the pooled width is remembered
    assert model(x).shape == (2, 5)
    with pytest.raises(kdna_fx.KDNAError, match="average"):
        model.reset_classifier(5, global_pool="max")


@pytest.mark.parametrize("tname", ["kdna_resnet18", "kdna_mobilenet_v2_050", "kdna_convnext_tiny"])
def test_grad_checkpointing_recomputes_each_stage_with_the_same_gradients(tname: str) -> None:
    model = api_model(tname, gate_norm="layer").train()
    twin = copy.deepcopy(model)
    twin.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    stage = twin.get_submodule(twin._stages[-1].removesuffix(".*"))
    last = list(stage)[-1] if twin._stages[-1].endswith(".*") else stage
    # A pre-hook: recomputation stops early (torch.utils.checkpoint's early stop), before the forward hooks.
    last.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    for m in (model, twin):
        torch.manual_seed(1)  # the same stochastic depth draws in both
        m(x).square().mean().backward()
    assert len(calls) == 2, "a checkpointed stage runs again in the backward pass"
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_timms_fine_tuning_flow_runs_on_a_zoo_model() -> None:
    from timm.optim import create_optimizer_v2

    model = api_model("kdna_resnet18", gate_norm="layer")
    model.reset_classifier(4)
    model.set_grad_checkpointing()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3)
    head = model.get_classifier().weight.detach().clone()
    loss = nn.functional.cross_entropy(model.train()(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model.get_classifier().weight, head)
    backbone = timm.create_model("kdna_resnet18", features_only=True, width=0.25)  # features_only still works
    assert [f.shape[1] for f in backbone.eval()(torch.randn(1, 3, 32, 32))] == backbone.feature_info.channels()
