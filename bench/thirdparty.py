"""A catalogue of small third-party CNNs, built offline and without weights, for sweeps over kdna_fx: a test
and bench fixture (tests/test_thirdparty_*.py, bench/library_coverage.py, bench/speed.py), not part of the library.

    from bench import thirdparty

    for name in sorted(thirdparty.BUILDERS):
        model = thirdparty.BUILDERS[name]().eval()       # a clear ModuleNotFoundError if its library is missing
        out = model(*thirdparty.EXAMPLE_INPUTS[name]())

Models of segmentation-models-pytorch, MONAI (2-D, 3-D and 1-D), Ultralytics, Hugging Face transformers (vision CNNs
and Wav2Vec2's 1-D feature encoder), efficientnet-pytorch, torchvision (quantizable, detection and 3-D video
models), timm, and a 1-D ResNet of kdna_fx's own. This module imports none of those libraries: each builder
imports its own, and a missing one raises a ``ModuleNotFoundError`` that names the library and the pip extra (``pip install 'kdna_fx[thirdparty]'``; Ultralytics
itself ``pip install --no-deps ultralytics``, as the Makefile does, since its requirements pull a GUI OpenCV).

- ``BUILDERS[id]``: zero-argument function returning the model (random init, nothing downloaded).
- ``EXAMPLE_INPUTS[id]``: zero-argument function returning the positional-argument tuple for ``forward``
  (small spatial sizes so a CPU forward is fast; a fresh tensor on every call, in the default dtype).
- ``LIBRARY[id]``: the pip distribution name of the library the model comes from.
- ``MODULE[id]``: its top-level import name, for ``pytest.importorskip`` or ``available`` (differs from the
  distribution name for e.g. segmentation-models-pytorch -> segmentation_models_pytorch).
- ``NOTES[id]``: one line on the model and anything unusual about its input or output.

Environment: a builder sets (setdefault, so an explicit value wins) the variables that keep Hugging Face and
Ultralytics offline and keep Ultralytics' settings file under /tmp instead of the home directory, before it
imports its library; the Ultralytics builders also point its runs/weights/datasets directories at /tmp and turn
its analytics sync off. Importing this module changes nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import tempfile
from typing import Callable, NamedTuple

import torch

from kdna_fx import AdapterConfig, KDNAConfig

_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "YOLO_OFFLINE": "1",  # ultralytics.utils.is_online() -> False without a DNS probe
    "YOLO_CONFIG_DIR": os.path.join(tempfile.gettempdir(), "kdna_fx_ultralytics"),  # settings.json goes here
    "YOLO_VERBOSE": "False",
}
EXTRA = "thirdparty"
"""The pip extra of kdna_fx that installs the catalogue's libraries: ``pip install 'kdna_fx[thirdparty]'``."""


def _offline_env() -> None:
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def _missing(name: str, library: str, module: str) -> ModuleNotFoundError:
    extra = ("pip install --no-deps ultralytics (its other requirements: " if module == "ultralytics" else "") + \
        f"pip install 'kdna_fx[{EXTRA}]'" + (")" if module == "ultralytics" else "")
    return ModuleNotFoundError(f"the catalogue model {name!r} needs {library} (import {module}), which is not "
                               f"installed: {extra}", name=module)


def available(name: str) -> bool:
    """Whether the library of catalogue model ``name`` is installed (its builder will not fail to import it)."""
    return importlib.util.find_spec(ENTRIES[name].module) is not None


class Entry(NamedTuple):
    build: Callable[[], torch.nn.Module]
    example_inputs: Callable[[], tuple]
    library: str  # pip distribution name
    module: str  # import name
    note: str


ENTRIES: dict[str, Entry] = {}


def _register(name: str, library: str, module: str, note: str, example_inputs: Callable[[], tuple]):
    def decorator(build: Callable[[], torch.nn.Module]):
        if name in ENTRIES:
            raise ValueError(f"duplicate catalogue id {name!r}")

        @functools.wraps(build)
        def offline_build() -> torch.nn.Module:
            if importlib.util.find_spec(module) is None:
                raise _missing(name, library, module)
            _offline_env()
            try:
                return build()
            except ModuleNotFoundError as exc:  # a library the model's own library needs
                if exc.name is None or importlib.util.find_spec(exc.name.partition(".")[0]) is not None:
                    raise
                raise _missing(name, exc.name.partition(".")[0], exc.name.partition(".")[0]) from exc

        ENTRIES[name] = Entry(offline_build, example_inputs, library, module, note)
        return offline_build
    return decorator


def _image(size: int = 64, batch: int = 2, channels: int = 3) -> Callable[[], tuple]:
    return lambda: (torch.randn(batch, channels, size, size),)


def _image_list(size: int = 128, batch: int = 2) -> Callable[[], tuple]:
    # torchvision detectors take a list of CHW images; eval forward returns a list of dicts
    return lambda: ([torch.rand(3, size, size) for _ in range(batch)],)


# --- segmentation-models-pytorch (input H, W must be divisible by 32) -------------------------------------

_SMP, _SMP_MOD = "segmentation-models-pytorch", "segmentation_models_pytorch"


def _smp(arch: str, encoder: str, **kwargs):
    import segmentation_models_pytorch as smp
    return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=2, **kwargs)


@_register("smp-unet-resnet18", _SMP, _SMP_MOD, "smp.Unet, resnet18 encoder; H, W divisible by 32", _image(64))
def smp_unet_resnet18():
    return _smp("Unet", "resnet18")


@_register("smp-fpn-resnet18", _SMP, _SMP_MOD, "smp.FPN, resnet18 encoder; H, W divisible by 32", _image(64))
def smp_fpn_resnet18():
    return _smp("FPN", "resnet18")


@_register("smp-deeplabv3plus-resnet18", _SMP, _SMP_MOD,
           "smp.DeepLabV3Plus, resnet18 encoder (output stride 16, dilated stage 4); H, W divisible by 16",
           _image(64))
def smp_deeplabv3plus_resnet18():
    return _smp("DeepLabV3Plus", "resnet18")


@_register("smp-unetplusplus-resnet18", _SMP, _SMP_MOD, "smp.UnetPlusPlus, resnet18 encoder; H, W divisible by 32",
           _image(64))
def smp_unetplusplus_resnet18():
    return _smp("UnetPlusPlus", "resnet18")


@_register("smp-unet-mobilenet_v2", _SMP, _SMP_MOD, "smp.Unet, torchvision-style mobilenet_v2 encoder",
           _image(64))
def smp_unet_mobilenet_v2():
    return _smp("Unet", "mobilenet_v2")


@_register("smp-fpn-efficientnet-b0", _SMP, _SMP_MOD,
           "smp.FPN, efficientnet-b0 encoder (smp's copy of efficientnet-pytorch: static-same padding, "
           "MemoryEfficientSwish autograd.Function)", _image(64))
def smp_fpn_efficientnet_b0():
    return _smp("FPN", "efficientnet-b0")


# --- MONAI (2-D networks, spatial_dims=2) ------------------------------------------------------------------

_MONAI, _TV = "monai", "torchvision"


@_register("monai-basicunet", _MONAI, _MONAI, "monai BasicUNet 2-D, features (8, 8, 16, 32, 64, 8)", _image(64))
def monai_basicunet():
    from monai.networks.nets import BasicUNet
    return BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, features=(8, 8, 16, 32, 64, 8))


@_register("monai-unet", _MONAI, _MONAI, "monai UNet 2-D, channels (8, 16, 32, 64), 2 residual units",
           _image(64))
def monai_unet():
    from monai.networks.nets import UNet
    return UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                num_res_units=2)


@_register("monai-dynunet", _MONAI, _MONAI, "monai DynUNet 2-D (nnU-Net style), 4 levels, filters 16..128",
           _image(64))
def monai_dynunet():
    from monai.networks.nets import DynUNet
    return DynUNet(spatial_dims=2, in_channels=3, out_channels=2, kernel_size=[3, 3, 3, 3],
                   strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2], filters=[16, 32, 64, 128], res_block=True)


@_register("monai-segresnet", _MONAI, _MONAI, "monai SegResNet 2-D, init_filters 8; H, W divisible by 8",
           _image(64))
def monai_segresnet():
    from monai.networks.nets import SegResNet
    return SegResNet(spatial_dims=2, init_filters=8, in_channels=3, out_channels=2)


# --- MONAI 3-D and 1-D networks (volumes [B, C, D, H, W], signals [B, C, L]) --------------------------------

def _volume(size: int, batch: int = 2) -> Callable[[], tuple]:
    return lambda: (torch.randn(batch, 1, size, size, size),)


@_register("monai-unet-3d", _MONAI, _MONAI, "monai UNet 3-D, channels (8, 16, 32, 64), 2 residual units, 16^3",
           _volume(16))
def monai_unet_3d():
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                num_res_units=2)


@_register("monai-dynunet-3d", _MONAI, _MONAI, "monai DynUNet 3-D (nnU-Net style), 4 levels, filters 8..64, 16^3; "
           "shared with stage_depth=0 (an encoder level and its decoder level)", _volume(16))
def monai_dynunet_3d():
    from monai.networks.nets import DynUNet
    return DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3, 3],
                   strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2], filters=[8, 16, 32, 64], res_block=True)


@_register("monai-segresnet-3d", _MONAI, _MONAI, "monai SegResNet 3-D, init_filters 8, 16^3", _volume(16))
def monai_segresnet_3d():
    from monai.networks.nets import SegResNet
    return SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2)


@_register("monai-basicunet-3d", _MONAI, _MONAI, "monai BasicUNet 3-D, features (8, 8, 16, 32, 64, 8), 32^3 "
           "(16^3 leaves a 1^3 map that its InstanceNorm cannot train on)", _volume(32))
def monai_basicunet_3d():
    from monai.networks.nets import BasicUNet
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8))


@_register("monai-attentionunet-3d", _MONAI, _MONAI, "monai AttentionUnet 3-D, channels (8, 16, 32, 64), 16^3",
           _volume(16))
def monai_attentionunet_3d():
    from monai.networks.nets import AttentionUnet
    return AttentionUnet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64), strides=(2, 2, 2))


@_register("monai-swinunetr-3d", _MONAI, _MONAI, "monai SwinUNETR 3-D, feature_size 12, one block per stage, "
           "64^3 at batch 1 (its 32x downsampling needs 64^3 for InstanceNorm in training); the convs shared "
           "are its UNETR encoder and decoder blocks", _volume(64, batch=1))
def monai_swinunetr_3d():
    from monai.networks.nets import SwinUNETR
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


@_register("monai-unet-1d", _MONAI, _MONAI, "monai UNet 1-D, channels (8, 16, 32, 64), 2 residual units, "
           "signals of 64 samples", lambda: (torch.randn(2, 2, 64),))
def monai_unet_1d():
    from monai.networks.nets import UNet
    return UNet(spatial_dims=1, in_channels=2, out_channels=2, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                num_res_units=2)


# --- torchvision video networks (clips [B, 3, T, H, W]) ------------------------------------------------------

def _clip(frames: int = 4, size: int = 32) -> Callable[[], tuple]:
    return lambda: (torch.randn(2, 3, frames, size, size),)


def _video(name: str) -> torch.nn.Module:
    import torchvision
    model = torchvision.models.get_model(name, weights=None, num_classes=8)
    if name == "s3d":  # its last pool is fixed to 16x224x224 clips; an adaptive one (no parameters) runs small
        model.avgpool = torch.nn.AdaptiveAvgPool3d(1)
    return model


@_register("tv-r3d_18", _TV, _TV, "torchvision r3d_18 (33 M parameters, 3x3x3 convs), 8 classes, 4x32x32 clips",
           _clip())
def tv_r3d_18():
    return _video("r3d_18")


@_register("tv-mc3_18", _TV, _TV, "torchvision mc3_18 (3-D convs in the first stages, 1x3x3 after), 4x32x32 clips",
           _clip())
def tv_mc3_18():
    return _video("mc3_18")


@_register("tv-r2plus1d_18", _TV, _TV, "torchvision r2plus1d_18 ((2+1)-D: 1x3x3 then 3x1x1 convs), 4x32x32 clips",
           _clip())
def tv_r2plus1d_18():
    return _video("r2plus1d_18")


@_register("tv-s3d", _TV, _TV, "torchvision s3d (separable 1xkxk / kx1x1 Inception branches), adaptive last pool, "
           "8x64x64 clips", _clip(8, 64))
def tv_s3d():
    return _video("s3d")


# --- Ultralytics (packaged yamls; scale letter in the file name picks n) ------------------------------------

_UL = "ultralytics"
_UL_DIR = os.path.join(tempfile.gettempdir(), "kdna_fx_ultralytics")


def _ultralytics_settings():
    """Point ultralytics' run, weight and data directories at /tmp. Its defaults come from the git root above the
    installed package, which is this repository when the venv is .venv inside it (runs_dir=<repo>/runs)."""
    from ultralytics.utils import SETTINGS
    wanted = {"runs_dir": os.path.join(_UL_DIR, "runs"), "weights_dir": os.path.join(_UL_DIR, "weights"),
              "datasets_dir": os.path.join(_UL_DIR, "datasets"), "sync": False}
    if any(SETTINGS.get(k) != v for k, v in wanted.items()):
        SETTINGS.update(wanted)  # writes $YOLO_CONFIG_DIR/Ultralytics/settings.json, under /tmp by default


@_register("ultralytics-yolov8n", _UL, _UL,
           "ultralytics DetectionModel('yolov8n.yaml'), 80 classes; H, W divisible by 32; eval forward returns "
           "(predictions, feature list)", _image(64))
def ultralytics_yolov8n():
    from ultralytics.nn.tasks import DetectionModel
    _ultralytics_settings()
    return DetectionModel("yolov8n.yaml", verbose=False)


@_register("ultralytics-yolo11n", _UL, _UL,
           "ultralytics DetectionModel('yolo11n.yaml') (C3k2, C2PSA attention block); H, W divisible by 32",
           _image(64))
def ultralytics_yolo11n():
    from ultralytics.nn.tasks import DetectionModel
    _ultralytics_settings()
    return DetectionModel("yolo11n.yaml", verbose=False)


@_register("ultralytics-yolov8n-cls", _UL, _UL, "ultralytics ClassificationModel('yolov8n-cls.yaml'), 1000 classes",
           _image(64))
def ultralytics_yolov8n_cls():
    from ultralytics.nn.tasks import ClassificationModel
    _ultralytics_settings()
    return ClassificationModel("yolov8n-cls.yaml", verbose=False)


# --- Hugging Face transformers (vision CNNs from small configs) ---------------------------------------------

_HF = "transformers"


@_register("hf-resnet", _HF, _HF, "transformers ResNetModel, basic blocks, depths 1,1,1,1, widths 16..128; returns "
           "a ModelOutput", _image(64))
def hf_resnet():
    from transformers import ResNetConfig, ResNetModel
    return ResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                    layer_type="basic"))


@_register("hf-resnet-cls", _HF, _HF, "transformers ResNetForImageClassification, bottleneck blocks, 10 labels",
           _image(64))
def hf_resnet_cls():
    from transformers import ResNetConfig, ResNetForImageClassification
    return ResNetForImageClassification(ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256],
                                                     depths=[1, 1, 2, 1], layer_type="bottleneck", num_labels=10))


@_register("hf-convnext-cls", _HF, _HF, "transformers ConvNextForImageClassification, tiny config (depths 1,1,2,1, "
           "widths 16..128); 7x7 depthwise convs only", _image(64))
def hf_convnext_cls():
    from transformers import ConvNextConfig, ConvNextForImageClassification
    return ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                                                         num_labels=10))


@_register("hf-regnet-cls", _HF, _HF, "transformers RegNetForImageClassification, Y-type, groups width 8, "
           "depths 1,1,2,1", _image(64))
def hf_regnet_cls():
    from transformers import RegNetConfig, RegNetForImageClassification
    return RegNetForImageClassification(RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                                     depths=[1, 1, 2, 1], groups_width=8, layer_type="y",
                                                     num_labels=10))


@_register("hf-mobilenetv2-cls", _HF, _HF, "transformers MobileNetV2ForImageClassification, depth_multiplier 0.35, "
           "10 labels; TF-style 'same' padding by default", _image(64))
def hf_mobilenetv2_cls():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    return MobileNetV2ForImageClassification(MobileNetV2Config(depth_multiplier=0.35, image_size=64, num_labels=10))


@_register("hf-wav2vec2", _HF, _HF, "transformers Wav2Vec2Model from a small config (7 conv feature-encoder layers of "
           "32 channels, kernels 10, 3, 3, 3, 3, 2, 2; one transformer layer); 4,000 audio samples (12 frames: its "
           "training-time masking needs more than 10)", lambda: (torch.randn(2, 4000),))
def hf_wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    return Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                        num_conv_pos_embedding_groups=4))


# --- kdna_fx's own 1-D network --------------------------------------------------------------------------------

@_register("kdna-resnet-1d", "torch", "torch", "kdna_fx.testing.TinyResNet(dims=1): a two-stage 1-D ResNet "
           "(ECG-style signals of 64 samples)", lambda: (torch.randn(2, 3, 64),))
def kdna_resnet_1d():
    from kdna_fx.testing import TinyResNet
    return TinyResNet(width=16, dims=1)


# --- efficientnet-pytorch -----------------------------------------------------------------------------------

@_register("effnet-pytorch-b0", "efficientnet-pytorch", "efficientnet_pytorch",
           "efficientnet_pytorch EfficientNet.from_name('efficientnet-b0'), 10 classes; static-same padding, "
           "MemoryEfficientSwish autograd.Function", _image(64))
def effnet_pytorch_b0():
    from efficientnet_pytorch import EfficientNet
    return EfficientNet.from_name("efficientnet-b0", num_classes=10)


# --- torchvision quantizable and detection models -----------------------------------------------------------

@_register("tv-quant-resnet18", _TV, _TV, "torchvision.models.quantization.resnet18(quantize=False): "
           "QuantStub/DeQuantStub, FloatFunctional add, float weights", _image(64))
def tv_quant_resnet18():
    from torchvision.models.quantization import resnet18
    return resnet18(weights=None, quantize=False, num_classes=10)


@_register("tv-quant-mobilenet_v2", _TV, _TV, "torchvision.models.quantization.mobilenet_v2(quantize=False)",
           _image(64))
def tv_quant_mobilenet_v2():
    from torchvision.models.quantization import mobilenet_v2
    return mobilenet_v2(weights=None, quantize=False, num_classes=10)


@_register("tv-fasterrcnn-mobilenet_v3_large_320_fpn", _TV, _TV,
           "torchvision fasterrcnn_mobilenet_v3_large_320_fpn, 3 classes, resized to 160 (min/max_size); input "
           "is a list of CHW images, eval output a list of dicts", _image_list(128))
def tv_fasterrcnn_mobilenet_v3_large_320_fpn():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn
    return fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                 min_size=160, max_size=160)


@_register("tv-fasterrcnn-resnet18-fpn", _TV, _TV,
           "torchvision FasterRCNN on resnet_fpn_backbone('resnet18'), 3 classes, resized to 128, 150 RPN proposals; "
           "input is a list of CHW images, eval output a list of dicts", _image_list(128))
def tv_fasterrcnn_resnet18_fpn():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    # 150 proposals as in the mobilenet 320 detector: the default 1000 through the 12.5 M-weight box head cost
    # about 2.8 s per forward at random init on 2 CPU cores
    return FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128, rpn_pre_nms_top_n_test=150,
                      rpn_post_nms_top_n_test=150)


# --- timm ---------------------------------------------------------------------------------------------------

@_register("timm-resnet18", "timm", "timm", "timm resnet18, pretrained=False, 10 classes", _image(64))
def timm_resnet18():
    import timm
    return timm.create_model("resnet18", pretrained=False, num_classes=10)


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {name: e.build for name, e in ENTRIES.items()}
EXAMPLE_INPUTS: dict[str, Callable[[], tuple]] = {name: e.example_inputs for name, e in ENTRIES.items()}
LIBRARY: dict[str, str] = {name: e.library for name, e in ENTRIES.items()}
MODULE: dict[str, str] = {name: e.module for name, e in ENTRIES.items()}
NOTES: dict[str, str] = {name: e.note for name, e in ENTRIES.items()}

# Models transformed with another than the default config (the note says which, and why): the sweep
# (tests/test_thirdparty_sweep.py) and the coverage table (bench/library_coverage.py) both read it.
CONFIGS: dict[str, KDNAConfig] = {"monai-dynunet-3d": KDNAConfig(stage_depth=0)}


def config(name: str) -> KDNAConfig:
    """The KDNAConfig catalogue model ``name`` is transformed with (the default unless CONFIGS says otherwise)."""
    return CONFIGS.get(name, KDNAConfig())


def preserving(config: KDNAConfig) -> KDNAConfig:
    """``config`` made function-preserving: every conv shared (``only_if_smaller=False``), each child with a
    full-rank residual, so ``init="trained"`` reproduces the original exactly."""
    return dataclasses.replace(config, only_if_smaller=False, adapter=AdapterConfig(rank="full"))
