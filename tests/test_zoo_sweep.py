"""Every torchvision classification builder (weights=None): transform, forward, backward.

Each model must either be shared (finite outputs and gradients, fewer parameters) or be one of the
models listed below with the reason kdna_fx leaves it unchanged (NoEligibleConvWarning). A model
whose outcome changes fails this test, in either direction, so the lists stay true.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import kdna_fx

# Tier integration: make test-fast leaves it out (every torchvision classifier (the full list: marker sweep)).
pytestmark = pytest.mark.integration

NO_FAMILY_3X3 = "3x3 convs are depthwise or differ in shape within every stage"
UNCHANGED = {
    "alexnet": "its three 3x3 convs all differ in shape (192->384, 384->256, 256->256)",
    "convnext_base": "only depthwise 7x7 and patchify convs", "convnext_large": "only depthwise 7x7 and patchify convs",
    "convnext_small": "only depthwise 7x7 and patchify convs", "convnext_tiny": "only depthwise 7x7 and patchify convs",
    **{f"efficientnet_b{i}": "3x3 convs are depthwise (MBConv); pointwise sharing needs kernel_sizes=(1,)"
       for i in range(8)},
    "googlenet": "each Inception block is its own stage and its 3x3 convs differ in shape",
    "inception_v3": "each Inception block is its own stage and its 3x3 convs differ in shape",
    "maxvit_t": "3x3 convs are depthwise (MBConv); the rest is attention",
    **{f"mnasnet{w}": NO_FAMILY_3X3 for w in ("0_5", "0_75", "1_0", "1_3")},
    "mobilenet_v2": "3x3 convs are depthwise; the reference shares the 1x1 convs (kernel_sizes=(1,))",
    "mobilenet_v3_large": NO_FAMILY_3X3, "mobilenet_v3_small": NO_FAMILY_3X3,
    **{f"shufflenet_v2_x{w}": NO_FAMILY_3X3 for w in ("0_5", "1_0", "1_5", "2_0")},
    **{f"swin_{v}": "attention model: its only conv is the 4x4 patch embedding"
       for v in ("b", "s", "t", "v2_b", "v2_s", "v2_t")},
    **{f"vit_{v}": "attention model: its only conv is the patch embedding"
       for v in ("b_16", "b_32", "h_14", "l_16", "l_32")},
    **{n: "grouped 3x3 convs too thin: each adapter would cost more than the kernel it shares (only_if_smaller)"
       for n in ("resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")},
}
# Builders that need other arguments or a minimum input size to run small.
BUILD_KWARGS = {"googlenet": dict(aux_logits=False, init_weights=False),
                "inception_v3": dict(aux_logits=False, init_weights=False),
                **{f"vit_{v}": dict(image_size=64 if v.endswith(("16", "32")) else 56)
                   for v in ("b_16", "b_32", "h_14", "l_16", "l_32")}}
INPUT_SIZE = {"inception_v3": 75, "maxvit_t": 224, "vit_h_14": 56}
# Models over 150 M parameters: vit_l_16, vit_l_32 and convnext_large run in the default suite (this whole file
# peaked at 8.9 GB, 16.6 GB without collecting garbage by memory: tests/conftest.py). The two largest, regnet_y_128gf (644 M) and
# vit_h_14 (632 M), are marked slow: 33 s and 20 s of the default suite (2026-12-06), for families the smaller
# regnets and ViTs already cover; `make test-slow` runs them.
SLOW = {"regnet_y_128gf", "vit_h_14"}
ALL = torchvision.models.list_models(module=torchvision.models)


# The default tier runs this sample (9 cheap torchvision classifiers of different kinds); the rest are marked
# sweep (make test-all).
SAMPLE = {"resnet18", "squeezenet1_1", "googlenet", "swin_v2_t", "mobilenet_v3_large",
          "inception_v3", "shufflenet_v2_x0_5", "regnet_y_400mf", "efficientnet_b0"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] * (n in SLOW)
                                               + [pytest.mark.sweep] * (n not in SAMPLE)) for n in ALL])
def test_zoo_model_is_shared_or_documented(name, model_sweep, tmp_path):
    torch.manual_seed(0)
    model = kdna_fx.models.create_model(f"torchvision/{name}", **BUILD_KWARGS.get(name, {}))  # weights=None
    kmodel, unchanged = model_sweep.transform(model)
    size = INPUT_SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size)
    out = kmodel(x)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    model_sweep.check(name, model, kmodel, unchanged, UNCHANGED)
    model_sweep.reloads(kmodel, x, tmp_path)


def test_the_lists_name_real_models():
    assert set(UNCHANGED) <= set(ALL) and set(BUILD_KWARGS) <= set(ALL)
