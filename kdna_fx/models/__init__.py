"""The kdna_fx model zoo: KernelDNA reference topologies, their plain baselines and replace-mode twins.

    model = kdna_fx.models.create_model("kdna_resnet18", num_classes=10, in_chans=1, small_stem=True, width=0.25)
    kdna_fx.models.list_models("*resnet*")

Names: ``<arch>`` is the plain torchvision model (weights=None), ``replace_<arch>`` is kdna_fx.transform
applied to it, ``kdna_<arch>`` is the KernelDNA reference topology: a plain network rewritten by the same
transform with an explicit plan (so report, fold, save/load and export work on it). See docs/models.md.
"""
from . import convnext, mobilenet, resnet  # noqa: F401  (they register their models)
from ._registry import create_model, list_models, model_options, register, sharing_config

__all__ = ["create_model", "list_models", "model_options", "register", "sharing_config"]
