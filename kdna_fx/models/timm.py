"""The zoo in timm's registry: importing kdna_fx (with timm installed) registers every architecture and tag.

    timm.create_model("kdna_resnet50", num_classes=100)              # resnet50.kdna, the reference topology
    timm.create_model("kdna_resnet18_replace", features_only=True)   # resnet18.replace as a feature backbone
    timm.list_models("kdna_*")
    segmentation_models_pytorch.Unet("tu-kdna_resnet18", encoder_weights=None)

timm names: ``kdna_<arch>`` for the ``kdna`` tag, ``kdna_<arch>_<tag>`` for every other tag
(``kdna_resnet18_plain``, ``kdna_mobilenet_v2_odconv``). Each takes the options of ``create_model`` for the
same zoo name and builds the same model (same parameters), through timm's ``build_model_with_cfg``: the model
carries a ``pretrained_cfg`` (224 px, ImageNet mean and std, first conv, classifier; no weights), and
``features_only=True`` / ``out_indices`` wrap the network in timm's ``FeatureListNet`` *before* the tag's
transform, so the feature backbone shares its kernels exactly as the classifier does (families whose convs
the wrapper drops are left out). ``feature_info`` gives the stages' channels and reductions.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..carried import keep
from ..errors import ConfigError
from ..spec import stamp
from ._registry import TAGS, Arch, architectures, model_options, recipe, tags

_PROBE = 64
"""Side of the input the feature stages are measured on (divisible by every reduction)."""
_KEPT = ("pretrained_cfg", "default_cfg", "feature_info", "output_fmt", "_traits", "in_chans")
"""What timm's builder leaves on its model that the tag's finished model (a peer conversion or features wrapper may be
another object) must keep."""

_UNUSED = ("drop_rate", "drop_path_rate", "drop_block_rate")
"""Regularisers timm's train script always passes (``--drop`` defaults to 0.0): taken at zero, refused else."""

default_cfgs: dict[str, Any] = {}  # read by timm's register_model


def timm_name(arch: str, tag: str) -> str:
    """The timm name of the zoo name ``<arch>.<tag>``."""
    return f"kdna_{arch}" if TAGS[tag].reference else f"kdna_{arch}_{tag}"


def feature_info(net: nn.Module, modules: tuple[str, ...], in_chans: int) -> list[dict[str, Any]]:
    """timm's feature_info of ``net``: for each module of ``modules``, its output channels and reduction,
    measured on one zero image (on the network's device: timm may build on the meta device)."""
    first = next(net.parameters())
    shapes: dict[str, torch.Size] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:  # returns None: the output stays
            shapes.setdefault(name, out.shape)
        return hook

    hooks = [net.get_submodule(m).register_forward_hook(record(m)) for m in modules]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, in_chans, _PROBE, _PROBE, device=first.device, dtype=first.dtype))
    finally:
        net.train(was_training)  # a fresh network: every submodule was in this mode
        for hook in hooks:
            hook.remove()
    return [{"module": m, "num_chs": shapes[m][1], "reduction": _PROBE // shapes[m][-1]} for m in modules]


def _entrypoint(arch: Arch, tag: str) -> Callable[..., nn.Module]:
    zoo_name, name = f"{arch.name}.{tag}", timm_name(arch.name, tag)
    modules = arch.reference_features if TAGS[tag].reference else arch.plain_features
    ours = set(model_options(zoo_name))

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ConfigError(f"{name} has no pretrained weights: create it with pretrained=False and load a "
                              f"checkpoint (kdna_fx.load)")
        asked = {k: kwargs.pop(k) for k in _UNUSED if k in kwargs and k not in ours}
        if any(asked.values()):
            raise ConfigError(f"{name} takes no {', '.join(k for k, v in asked.items() if v)} (it takes "
                              f"{sorted(ours)}): leave them at 0")
        options = {k: v for k, v in kwargs.items() if k in ours}
        timm_kwargs = {k: v for k, v in kwargs.items() if k not in ours}  # features_only, pretrained_cfg, ...
        nets: list[nn.Module] = []

        def build_net(make: Callable[..., nn.Module], **net_options: Any) -> nn.Module:
            def make_described(**built_with: Any) -> nn.Module:
                net = make(**built_with)
                net.feature_info = feature_info(net, modules, built_with.get("in_chans", 3))
                nets.append(net)
                return net

            feature_cfg = {"out_indices": tuple(range(len(modules))),
                           "flatten_sequential": any("." in m for m in modules)}
            return build_model_with_cfg(make_described, name, pretrained=False, feature_cfg=feature_cfg,
                                        **net_options, **timm_kwargs)

        built, finish = recipe(zoo_name, options, build_net)
        model = finish(built, nets[-1])
        for attr in _KEPT:
            if attr in vars(built):
                keep(model, attr, vars(built)[attr])
        if not kwargs.get("features_only"):
            keep(model, "num_classes", options.get("num_classes", 1000))  # timm's train script reads it
            if not timm_kwargs.keys() - {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}:
                stamp(model, zoo_name, options)  # the same model as create_model(zoo_name, **options)
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"kdna_fx.models.create_model({zoo_name!r}, ...) as a timm model (see kdna_fx.models.timm)."
    return entry


def _cfg(arch: Arch) -> dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": arch.first_conv, "classifier": arch.classifier}


def register_all() -> list[str]:
    """Register every zoo architecture and tag in timm (again: a later registration replaces the earlier);
    returns the timm names."""
    names = []
    for arch in architectures().values():
        for tag in tags(arch):
            name = timm_name(arch.name, tag)
            default_cfgs.update(generate_default_cfgs({name: _cfg(arch)}))
            register_model(_entrypoint(arch, tag))
            names.append(name)
    return names


REGISTERED = register_all()
