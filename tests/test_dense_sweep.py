"""Every torchvision detection, segmentation, optical-flow and video builder (weights=None, small inputs):
transform, an eval forward, and a training step with targets where the model takes them.

Each model must either be shared (finite outputs and gradients, fewer parameters than the original) or be
listed in UNCHANGED with the reason kdna_fx leaves it as it was (NoEligibleConvWarning). A model whose
outcome changes fails this test in either direction, so the lists stay true. Most of these models cannot be
traced as a whole (data-dependent control flow in their forward, docs/partial-tracing.md): their backbones
and other traceable subtrees are rewritten in place and the rest runs as it was.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import detection, optical_flow, segmentation, video
from torchvision.ops import MultiScaleRoIAlign

import kdna_fx

# Tier integration: make test-fast leaves it out (torchvision detection, segmentation, flow and video models).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

MBV3 = "MobileNetV3 backbone: its 3x3 convs are depthwise or differ in shape within every stage"
UNCHANGED = {
    "ssdlite320_mobilenet_v3_large": MBV3 + "; its heads' convs are depthwise or 1x1",
    "deeplabv3_mobilenet_v3_large": MBV3 + "; the ASPP's dilated 3x3 convs differ in dilation",
    "lraspp_mobilenet_v3_large": MBV3 + "; the LR-ASPP head has only 1x1 convs",
    "mvit_v1_b": "video transformer: its only conv is the 3-D patch embedding",
    "mvit_v2_s": "video transformer: its only conv is the 3-D patch embedding",
    "swin3d_b": "video transformer: its only conv is the 3-D patch embedding",
    "swin3d_s": "video transformer: its only conv is the 3-D patch embedding",
    "swin3d_t": "video transformer: its only conv is the 3-D patch embedding",
}

DETECTION = torchvision.models.list_models(module=detection)
SEGMENTATION = torchvision.models.list_models(module=segmentation)
FLOW = torchvision.models.list_models(module=optical_flow)
VIDEO = torchvision.models.list_models(module=video)
# Models whose builders fix a large input (measured on the shared 2-core machine, one thread).
SLOW = {
    "ssd300_vgg16": "VGG-16 at its fixed 300x300 input (its extra layers need at least ~260 px): 36 s",
    "mvit_v1_b": "the builder fixes the input to 16x224x224 (positional embedding): 92 s",
    "mvit_v2_s": "the builder fixes the input to 16x224x224 (relative positions): 101 s",
    "swin3d_b": "88 M parameters: 13 s, half of it building the model",
}
CLIP = {"mvit_v1_b": (16, 224, 224), "mvit_v2_s": (16, 224, 224), "s3d": (8, 64, 64)}  # (T, H, W); else 4x32x32
ALL = DETECTION + SEGMENTATION + FLOW + VIDEO

# Few proposals and detections: with random weights every anchor is a candidate, and the R-CNN heads (4 convs
# of 256 channels for Mask R-CNN, 8 of 512 for Keypoint R-CNN, 3.7 GMACs per region at their default 14x14
# RoI pool) would otherwise run on hundreds of regions.
RCNN_SMALL = dict(min_size=64, max_size=64, rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=16,
                  rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=16, box_batch_size_per_image=8,
                  box_detections_per_img=2)
SMALL_ROI_POOL = {"maskrcnn": "mask_roi_pool", "keypointrcnn": "keypoint_roi_pool"}
ONE_STAGE_SMALL = dict(min_size=64, max_size=64, topk_candidates=64, detections_per_img=8)
SSD_SMALL = dict(topk_candidates=64, detections_per_img=8)
DETECTION_SIZE = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320}  # fixed_size of their transforms


def _build_kwargs(name: str) -> dict:
    if name in DETECTION:
        small = SSD_SMALL if name.startswith("ssd") else ONE_STAGE_SMALL if name.startswith(
            ("fcos", "retinanet")) else RCNN_SMALL
        pools = {arg: MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
                 for prefix, arg in SMALL_ROI_POOL.items() if name.startswith(prefix)}
        return dict(weights=None, weights_backbone=None, num_classes=3, **small, **pools)
    if name in SEGMENTATION:
        return dict(weights=None, weights_backbone=None, num_classes=3, aux_loss=False)
    if name in VIDEO:
        return dict(weights=None, num_classes=8)
    return dict(weights=None)


def _finite(value: object) -> bool:
    """Every floating tensor in a (nested) output is finite."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def _detection_targets(name: str, size: int) -> list[dict[str, torch.Tensor]]:
    """Two images' targets: two boxes each, with masks (Mask R-CNN) and 17 keypoints (Keypoint R-CNN)."""
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]]) * (size / 64)
    targets = []
    for _ in range(2):
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        if name.startswith("maskrcnn"):
            masks = torch.zeros(2, size, size, dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
                mask[y0:y1, x0:x1] = 1
            target["masks"] = masks
        if name.startswith("keypointrcnn"):
            keypoints = torch.ones(2, 17, 3)
            keypoints[..., :2] = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2  # visible, inside each box
            target["keypoints"] = keypoints
        targets.append(target)
    return targets


def _run_detection(name: str, model: nn.Module) -> torch.Tensor:
    size = DETECTION_SIZE.get(name, 64)
    images = [torch.rand(3, size, size) for _ in range(2)]
    with torch.no_grad():
        assert _finite(model.eval()(images))
    losses = model.train()(images, _detection_targets(name, size))
    assert set(losses) >= {"loss_classifier", "loss_box_reg"} or set(losses) >= {"classification", "bbox_regression"}
    assert ("loss_mask" in losses) == name.startswith("maskrcnn")
    assert ("loss_keypoint" in losses) == name.startswith("keypointrcnn")
    return sum(losses.values())


def _run_segmentation(name: str, model: nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _finite(model.eval()(x))
    out = model.train()(x)["out"]
    assert out.shape == (2, 3, 64, 64)
    return nn.functional.cross_entropy(out, torch.randint(0, 3, (2, 64, 64)))


def _run_flow(name: str, model: nn.Module) -> torch.Tensor:
    # RAFT's correlation pyramid needs feature maps of at least 16 pixels: images of 8 * 16 = 128.
    image1, image2 = torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert _finite(model.eval()(image1, image2, num_flow_updates=2))
    flows = model.train()(image1, image2, num_flow_updates=2)
    assert flows[-1].shape == (2, 2, 128, 128)
    return (flows[-1] - torch.randn(2, 2, 128, 128)).norm(dim=1).mean()  # end-point error of the last flow


def _run_video(name: str, model: nn.Module) -> torch.Tensor:
    clip = torch.randn(2, 3, *CLIP.get(name, (4, 32, 32)))
    with torch.no_grad():
        assert _finite(model.eval()(clip))
    return nn.functional.cross_entropy(model.train()(clip), torch.tensor([1, 2]))


def _runner(name: str) -> Callable[[str, nn.Module], torch.Tensor]:
    return (_run_detection if name in DETECTION else _run_segmentation if name in SEGMENTATION
            else _run_flow if name in FLOW else _run_video)


def _build(name: str) -> nn.Module:
    if name != "s3d":  # through the one resolver: the model records its builder, so load(path) rebuilds it
        options = {k: v for k, v in _build_kwargs(name).items() if k != "weights"}  # create_model builds no weights
        return kdna_fx.models.create_model(f"torchvision/{name}", **options)
    model = torchvision.models.get_model(name, **_build_kwargs(name))
    # Its last pool is fixed to 224x224x16 clips; an adaptive pool (no parameters, convs unchanged) runs small.
    model.avgpool = nn.AdaptiveAvgPool3d(1)
    return model


def _eval_inputs(name: str) -> tuple[object, dict[str, object]]:
    """What the model of ``name`` takes in eval mode (for the save/load round trip)."""
    if name in DETECTION:
        size = DETECTION_SIZE.get(name, 64)
        return [torch.rand(3, size, size) for _ in range(2)], {}
    if name in SEGMENTATION:
        return torch.randn(2, 3, 64, 64), {}
    if name in FLOW:
        return torch.rand(2, 3, 128, 128), {"image2": torch.rand(2, 3, 128, 128), "num_flow_updates": 2}
    return torch.randn(2, 3, *CLIP.get(name, (4, 32, 32))), {}


# The default tier runs this sample (a cheap model of each kind); the rest are marked sweep (make test-all).
SAMPLE = {"raft_small", "r3d_18", "s3d", "swin3d_t", "lraspp_mobilenet_v3_large",
          "deeplabv3_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] * (n in SLOW)
                                               + [pytest.mark.sweep] * (n not in SAMPLE)) for n in ALL])
def test_dense_model_is_shared_or_documented(name, model_sweep, tmp_path):
    torch.manual_seed(0)
    model = _build(name)
    kmodel, unchanged = model_sweep.transform(model)
    loss = _runner(name)(name, kmodel)
    assert torch.isfinite(loss)
    loss.backward()
    model_sweep.check(name, model, kmodel, unchanged, UNCHANGED)
    # A model built with an option JSON cannot hold (the small RoI pools given to some detectors) or changed by
    # hand after building (s3d's pool) records no spec: load(path) needs it given, tested elsewhere.
    if kdna_fx.models.spec_of(model) is not None and name != "s3d":
        x, kwargs = _eval_inputs(name)
        model_sweep.reloads(kmodel, x, tmp_path, **kwargs)


def test_the_lists_name_real_models():
    assert set(UNCHANGED) <= set(ALL) and set(SLOW) <= set(ALL) and set(CLIP) <= set(ALL)
    assert FLOW and VIDEO and len(DETECTION) >= 10 and len(SEGMENTATION) >= 5


def test_a_skipped_conv_names_what_keeps_it_out_of_a_family():
    """DeepLabV3's ASPP convs have one kernel shape but different dilations: each sits in a family of its own,
    and the reason says which dilation (not '1 conv of shape 960->256' when there are three)."""
    model = torchvision.models.get_model("deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None,
                                         num_classes=3)
    reasons = {s.name: s.reason for s in kdna_fx.plan(model).skipped}
    assert "960->256 3x3 dilation=(12, 12)" in reasons["classifier.0.convs.1.0"]
    assert "dilation" not in reasons["classifier.1"]
