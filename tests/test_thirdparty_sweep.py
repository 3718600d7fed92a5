"""Models from the libraries vision people build on (bench.thirdparty), each built without weights and
offline, through kdna_fx with example inputs, as a new user would take them: every outcome is shared (every check
passes) or unchanged with a warning that says why; never a crash at the first forward, never a different
function. The expected outcome and path of each model is listed here, so a change in either direction fails.

For each model: transform with example inputs; an eval forward; a training step; fold equal to unfolded; save,
then load into a fresh instance, equal; and the function-preserving check of the issue: every conv shared at full
rank with init="trained" gives the original's outputs. docs/partial-tracing.md#coverage is this table in words.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import kdna_fx
from bench import thirdparty as catalogue
from kdna_fx.testing import output_tensors


# Tier integration: make test-fast leaves it out (smp, MONAI, Ultralytics, transformers, efficientnet-pytorch).
pytestmark = pytest.mark.integration

# model -> "shared" (its convs shared in the model itself, which keeps its class) or "unchanged" (nothing to share,
# with the reason NoEligibleConvWarning gives).
EXPECTED = {
    "smp-unet-resnet18": "shared",
    "smp-fpn-resnet18": "shared",
    "smp-deeplabv3plus-resnet18": "shared",
    "smp-unetplusplus-resnet18": "shared",
    "smp-unet-mobilenet_v2": "unchanged",  # 3x3 convs depthwise, the rest 1x1
    "smp-fpn-efficientnet-b0": "shared",
    "monai-basicunet": "shared",
    "monai-unet": "shared",
    "monai-dynunet": "unchanged",  # every 3x3 conv differs in shape from the others of its stage
    "monai-segresnet": "shared",
    "ultralytics-yolov8n": "shared",
    "ultralytics-yolo11n": "shared",
    "ultralytics-yolov8n-cls": "shared",
    "hf-resnet": "shared",
    "hf-resnet-cls": "shared",
    "hf-convnext-cls": "unchanged",  # depthwise 7x7 and patchify convs only
    "hf-regnet-cls": "shared",
    "hf-mobilenetv2-cls": "unchanged",  # 3x3 convs depthwise, the rest 1x1
    "effnet-pytorch-b0": "unchanged",  # depthwise and 1x1 convs only
    "tv-quant-resnet18": "shared",
    "tv-quant-mobilenet_v2": "unchanged",
    "tv-fasterrcnn-mobilenet_v3_large_320_fpn": "shared",
    "tv-fasterrcnn-resnet18-fpn": "shared",
    "timm-resnet18": "shared",
    # 3-D and 1-D (issue 32)
    "monai-unet-3d": "shared",
    "monai-dynunet-3d": "shared",
    "monai-segresnet-3d": "shared",
    "monai-basicunet-3d": "shared",
    "monai-attentionunet-3d": "unchanged",  # every 3x3x3 conv differs in shape; its 1x1x1 attention convs are thin
    "monai-swinunetr-3d": "shared",
    "monai-unet-1d": "shared",
    "tv-r3d_18": "shared",
    "tv-mc3_18": "shared",
    "tv-r2plus1d_18": "shared",
    "tv-s3d": "shared",
    "hf-wav2vec2": "shared",
    "kdna-resnet-1d": "shared",
}

def _eval(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return output_tensors(model.eval()(*inputs))


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and float((x - y).abs().max()) <= rtol * max(1.0, float(
        y.abs().max())) for x, y in zip(a, b))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return catalogue.BUILDERS[name]()


def _train_step(name: str, kmodel: nn.Module, inputs: tuple) -> None:
    kmodel.train()
    if name.startswith("tv-fasterrcnn"):  # torchvision's detectors take targets in training and return losses
        targets = [{"boxes": torch.tensor([[4.0, 6.0, 60.0, 70.0]]), "labels": torch.tensor([1])} for _ in inputs[0]]
        loss = sum(kmodel(*inputs, targets).values())
    else:
        loss = sum(t.float().pow(2).mean() for t in output_tensors(kmodel(*inputs)))
    loss.backward()
    grads = [p.grad for p in kmodel.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# Two models whose path a sibling checks run in make test-all: tv-fasterrcnn-resnet18-fpn checks torchvision's
# detection path (4 s), smp's Unet, FPN and DeepLabV3+ on the same encoder the Unet++ (4 s).
# The default tier keeps one of each kind (r3d_18, mc3_18 and s3d for video, MONAI's 3-D UNets): these are the
# slowest of their kind (about 10 s each on the 2-core machine) and add no kind of conv the others lack.
SLOW = {"tv-fasterrcnn-mobilenet_v3_large_320_fpn", "smp-unetplusplus-resnet18", "tv-r2plus1d_18", "monai-swinunetr-3d"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] * (n in SLOW)) for n in sorted(EXPECTED)])
def test_a_library_model_is_shared_or_unchanged_and_never_wrong(name, tmp_path, model_sweep):
    pytest.importorskip(catalogue.MODULE[name])
    model = _build(name).eval()
    inputs = catalogue.EXAMPLE_INPUTS[name]()
    expected_out = _eval(model, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kmodel = kdna_fx.transform(model, catalogue.config(name), example_inputs=inputs)
    unchanged = any(issubclass(w.category, kdna_fx.NoEligibleConvWarning) for w in caught)
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, kmodel))
    if EXPECTED[name] == "unchanged":
        assert unchanged and after == before, f"{name} is listed as unchanged but kdna_fx now shares it"
        assert _close(_eval(kmodel, inputs), expected_out, rtol=0)
        return
    assert not unchanged and after < before, f"{name}: kdna_fx found nothing to share"
    model_sweep.keeps_its_class(model, kmodel)

    out = _eval(kmodel, inputs)
    assert out and all(torch.isfinite(t).all() for t in out)
    _train_step(name, kmodel, catalogue.EXAMPLE_INPUTS[name]())
    assert _close(_eval(kdna_fx.fold(kmodel), inputs), _eval(kmodel, inputs))

    kdna_fx.save(kmodel, tmp_path / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = kdna_fx.load(tmp_path / "model.safetensors", _build(name))
    assert _close(_eval(loaded, inputs), _eval(kmodel, inputs), rtol=0)

    # The function-preserving check: every conv shared, each child reproducing its own kernel.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preserved = kdna_fx.transform(model, catalogue.preserving(catalogue.config(name)), init="trained",
                                      example_inputs=inputs)
    assert kdna_fx.plan_of(preserved).families
    assert _close(_eval(preserved, inputs), expected_out, rtol=1e-3)


def test_ultralytics_fuse_gives_a_clear_error_naming_the_fix():
    """Ultralytics' predict path fuses each Conv's BatchNorm into conv.weight; a gated child has no such kernel."""
    pytest.importorskip("ultralytics")
    name = "ultralytics-yolov8n"
    model = _build(name).eval()
    inputs = catalogue.EXAMPLE_INPUTS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kmodel = kdna_fx.transform(model, example_inputs=inputs)
    families = kdna_fx.plan_of(kmodel).families
    # the C2f bottleneck convs, which ultralytics runs through `list(self.cv1(x).chunk(2, 1))`, are shared
    assert any(".m.0.cv" in c for f in families for c in f.children)
    with pytest.raises(kdna_fx.KDNAError, match="Fuse BatchNorms before kdna_fx.transform"):
        kmodel.fuse()
    # the fix it names: fuse first, then transform
    fused = _build(name).eval().fuse()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kfused = kdna_fx.transform(fused, catalogue.preserving(catalogue.config(name)), init="trained",
                                   example_inputs=inputs)
    assert _close(_eval(kfused, inputs), _eval(fused, inputs), rtol=1e-3)
