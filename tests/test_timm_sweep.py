"""timm's CNN families, one small representative each (pretrained=False, nothing downloaded): transform,
an eval forward, and a training step on a classification loss.

Each model must either be shared (finite outputs and gradients, fewer parameters than the original) or be
listed in UNCHANGED with the reason kdna_fx leaves it as it was (NoEligibleConvWarning). A model whose
outcome changes fails this test in either direction, so the lists stay true. Models with parts torch.fx
cannot trace (vgg's pre-logits, MobileViT's transformer blocks, EfficientViT's attention) run those parts as
they were (docs/partial-tracing.md).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kdna_fx

timm = pytest.importorskip("timm")
# Tier integration: make test-fast leaves it out (one model per timm family).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

# timm module (family) -> a small representative; a few modules hold several families worth a name of their
# own (tinynet, fbnet, lcnet). Left out: nasnet and pnasnet (88 M parameters), mobilenetv5 (294 M parameters);
# the transformer-only families have no convs to share.
FAMILIES = {
    "resnet": "resnet10t", "resnetv2": "resnetv2_18", "regnet": "regnetx_002", "efficientnet": "efficientnet_b0",
    "efficientnet/tinynet": "tinynet_e", "efficientnet/fbnet": "fbnetc_100", "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv3/lcnet": "lcnet_050", "convnext": "convnext_atto", "densenet": "densenet121",
    "vgg": "vgg11_bn", "mobilevit": "mobilevit_xxs", "dla": "dla34", "dpn": "dpn48b", "ghostnet": "ghostnet_050",
    "hrnet": "hrnet_w18_small", "cspnet": "cs3darknet_s", "cspnext": "cspnext_tiny", "rexnet": "rexnet_100",
    "res2net": "res2net50_14w_8s", "resnest": "resnest14d", "selecsls": "selecsls42b",
    "xception_aligned": "xception41", "xception": "legacy_xception", "byobnet": "repvgg_a0",
    "byoanet": "botnet26t_256", "nfnet": "nf_resnet26", "hgnet": "hgnet_tiny", "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0", "vovnet": "ese_vovnet19b_slim_dw", "repghost": "repghostnet_050",
    "repvit": "repvit_m0_9", "fastvit": "fastvit_t8", "sknet": "skresnet18", "senet": "legacy_seresnet18",
    "inception_v3": "inception_v3", "inception_v4": "inception_v4", "inception_resnet_v2": "inception_resnet_v2",
    "tresnet": "tresnet_m", "starnet": "starnet_s1", "mambaout": "mambaout_femto", "rdnet": "rdnet_tiny",
    "metaformer": "poolformer_s12", "inception_next": "inception_next_atto", "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0", "fasternet": "fasternet_t0", "convmixer": "convmixer_768_32",
    "visformer": "visformer_tiny", "vision_transformer_hybrid": "vit_small_r26_s32_224",
    "maxxvit": "coatnet_0_rw_224", "levit": "levit_128s", "shvit": "shvit_s1", "swiftformer": "swiftformer_xs",
    "nextvit": "nextvit_small", "efficientvim": "efficientvim_m1", "lowformer": "lowformer_b0",
}
ALL = sorted(set(FAMILIES.values()))

DW = "3x3 convs are depthwise, the rest 1x1 or 5x5; pointwise sharing needs kernel_sizes=(1,)"
LARGE_DW = "its spatial convs are depthwise 7x7 (or larger) or patchify convs; the rest are 1x1"
HYBRID_DW = "conv-attention hybrid: its 3x3 convs are depthwise or each alone in its stage"
UNCHANGED = {
    **{n: DW for n in ("efficientnet_b0", "tinynet_e", "fbnetc_100", "mobilenetv3_small_050",
                       "lcnet_050", "ghostnet_050", "rexnet_100", "repghostnet_050",
                       "ese_vovnet19b_slim_dw", "repvit_m0_9", "xception41", "legacy_xception")},
    **{n: LARGE_DW for n in ("convnext_atto", "edgenext_xx_small", "fastvit_t8", "starnet_s1", "mambaout_femto",
                             "rdnet_tiny", "inception_next_atto", "convmixer_768_32")},
    **{n: HYBRID_DW for n in ("mobilevit_xxs", "efficientvit_b0", "efficientvit_m0", "shvit_s1",
                              "swiftformer_xs", "efficientvim_m1", "efficientformerv2_s0", "levit_128s",
                              "coatnet_0_rw_224")},
    "regnetx_002": "grouped 3x3 convs too thin: each adapter would cost more than the kernel it shares",
    "dpn48b": "grouped 3x3 convs too thin: each adapter would cost more than the kernel it shares",
    "resnest14d": "one block per stage: its split-attention 3x3 convs each have no same-shaped partner",
    "nf_resnet26": "weight-standardised convs (ScaledStdConv2d): each kernel is computed in the graph",
    "vit_small_r26_s32_224": "its ResNet's convs are weight-standardised (StdConv2dSame), computed in the graph",
    "inception_v3": "its 3x3 convs differ in shape or sit alone in their Inception block (each block is a stage)",
    "poolformer_s12": "token mixing is pooling; its only 3x3 convs are the downsampling stems, one per stage",
    "cspnext_tiny": "its 3x3 convs differ in shape or are depthwise within every stage",
    "efficientformer_l1": "pooling and attention blocks; its only 3x3 convs are the downsampling stems",
}
# Constructor arguments that keep a model small or let it run below its default resolution; the models'
# convolutions are the same as with the defaults.
CREATE_KWARGS = {
    "vgg11_bn": dict(mlp_ratio=1 / 64),  # the 7x7 4096-wide pre-logits conv (102 M parameters) made 64 wide
    **{n: dict(img_size=64) for n in ("botnet26t_256", "visformer_tiny", "vit_small_r26_s32_224",
                                      "coatnet_0_rw_224", "levit_128s", "efficientformerv2_s0")},
}
# Measured on the shared 2-core machine (one thread, other jobs running): the few that cost the most.
SLOW = {
    "inception_resnet_v2": "54 M parameters, at least 75 px: 21 s",
    "inception_v4": "41 M parameters, at least 75 px: 17 s",
    "vit_small_r26_s32_224": "36 M parameters, unchanged: 14 s", "convmixer_768_32": "768 channels at 1/7 scale: 11 s",
    "coatnet_0_rw_224": "27 M parameters, unchanged: 9.5 s", "efficientformer_l1": "fixed 224 px input: 8.7 s",
}
INPUT_SIZE = {"efficientformer_l1": 224, "inception_v3": 96, "inception_v4": 96, "inception_resnet_v2": 96}


# The default tier runs this sample (8 cheap timm families); the rest are marked sweep (make test-all).
SAMPLE = {"convnext_atto", "resnet10t", "mobilevit_xxs", "regnetx_002", "densenet121", "levit_128s",
          "resnest14d", "vgg11_bn"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] * (n in SLOW)
                                               + [pytest.mark.sweep] * (n not in SAMPLE)) for n in ALL])
def test_timm_model_is_shared_or_documented(name, model_sweep, tmp_path):
    torch.manual_seed(0)
    model = kdna_fx.models.create_model(f"timm/{name}", num_classes=8, **CREATE_KWARGS.get(name, {}))  # no weights
    kmodel, unchanged = model_sweep.transform(model)
    size = INPUT_SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.isfinite(kmodel.eval()(x)).all()
    loss = nn.functional.cross_entropy(kmodel.train()(x), torch.tensor([1, 2]))
    assert torch.isfinite(loss)
    loss.backward()
    model_sweep.check(name, model, kmodel, unchanged, UNCHANGED)
    model_sweep.reloads(kmodel, x, tmp_path)


def test_the_lists_name_real_models():
    known = set(timm.list_models())
    assert set(ALL) <= known and set(UNCHANGED) <= set(ALL)
    assert set(CREATE_KWARGS) <= set(ALL) and set(INPUT_SIZE) <= set(ALL) and set(SLOW) <= set(ALL)
