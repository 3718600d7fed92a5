"""The kdna_fx model zoo: KernelDNA reference topologies, their plain baselines, replace-mode twins and peers.

    model = kdna_fx.models.create_model("resnet18.kdna", num_classes=10, in_chans=1, small_stem=True, width=0.25)
    kdna_fx.models.create_model("timm/resnet26d.replace")      # any torchvision or timm model, without weights
    kdna_fx.models.list_models("resnet18.*")                  # resnet18.plain, .replace, .kdna, .relaxed, ...

Names are ``<arch>.<tag>`` (tags: plain, replace, kdna, relaxed, one per peer), ``torchvision/<name>[.<tag>]`` or
``timm/<name>[.<tag>]``; the v0.1 names (``kdna_resnet18``, ``replace_resnet50``) are aliases. Every model
``create_model`` builds records how (``spec_of``, a ``ModelSpec``), so ``kdna_fx.load(path)`` rebuilds it. Importing
kdna_fx registers the zoo in timm too (kdna_fx.models.timm). See docs/models.md.
"""
import importlib.util

from . import convnext, mobilenet, resnet  # noqa: F401  (they register their architectures)
from ._registry import (RELAXED_RANK, TAGS, Arch, Reference, Tag, architectures, create_model, is_model, list_models,
                        model_options, register_arch, sharing_config)
from ..spec import ModelSpec, record_input, spec_of

if importlib.util.find_spec("timm") is not None:  # the zoo in timm's registry: timm.create_model("kdna_resnet50")
    from . import timm  # noqa: F401

__all__ = ["RELAXED_RANK", "TAGS", "Arch", "ModelSpec", "Reference", "Tag", "architectures", "create_model", "is_model",
           "list_models", "model_options", "record_input", "register_arch", "sharing_config", "spec_of"]
