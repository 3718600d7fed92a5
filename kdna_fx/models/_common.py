"""Building blocks shared by the zoo: the reference topologies as a plain network plus a plan, option checks."""
from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor, fx, nn
from torch.utils.checkpoint import checkpoint

from ..config import AdapterConfig, KDNAConfig
from ..errors import ConfigError
from ..functional import GateNorm


def with_plan(model: nn.Module, families: Sequence[dict[str, Any]], config: KDNAConfig) -> nn.Module:
    """A reference topology: the plain ``model`` transformed by kdna_fx.transform with the given families.

    Each family is ``{"parent": conv name, "children": [conv names]}``; the transform is the one every user
    model goes through, so report, fold, save/load, as_function and export work on zoo models too.
    """
    from ..api import transform  # late: kdna_fx imports this package while it is being set up
    from ..datamodel import Plan

    return transform(model, config, plan=Plan.from_dict({"families": list(families)}), inplace=True)


def reference_config(gate_norm: GateNorm, *, kernel_sizes: tuple[int, ...] = (3,), stage_depth: int = 1,
                     reductions: dict[str, int] | None = None) -> KDNAConfig:
    """The config of a reference topology: SE gate (r = 4 unless ``reductions`` maps a conv-name regex to
    another r), F and S, every conv the plan names shared whatever its size (the reference counts)."""
    regex = [(pattern, AdapterConfig(reduction=r, gate_norm=gate_norm)) for pattern, r in (reductions or {}).items()]
    return KDNAConfig(adapter=AdapterConfig(gate_norm=gate_norm), by_name_regex=regex, kernel_sizes=kernel_sizes,
                      stage_depth=stage_depth, only_if_smaller=False)


def scaled(channels: int, width: float, divisor: int = 1) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (never below it, never 10% below the target)."""
    if divisor == 1:
        return max(1, int(round(channels * width)))
    target = channels * width
    value = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return value + divisor if value < 0.9 * target else value


def check_options(name: str, *, num_classes: Any, in_chans: Any, width: Any, small_stem: Any) -> None:
    """Raise a clear error for an option value the zoo cannot build."""
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}: {key} must be a positive integer, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ConfigError(f"{name}: width must be a positive number (channel multiplier, 1.0 = reference), "
                          f"got {width!r}")
    if not isinstance(small_stem, bool):
        raise ConfigError(f"{name}: small_stem must be True or False, got {small_stem!r}")


def kaiming_conv(in_chans: int, out_chans: int, kernel_size: int, stride: int, padding: int,
                 bias: bool = False) -> nn.Conv2d:
    """A stem conv initialised as torchvision initialises ResNet and MobileNetV2 convs."""
    conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class TimmAPI:
    """timm's model API on a zoo network (a mixin before its nn.Module class): ``forward_features``,
    ``forward_head``, ``get_classifier``, ``reset_classifier`` and ``set_grad_checkpointing``, so timm's
    fine-tuning code runs on ``timm.create_model("kdna_resnet18")`` and the other zoo names.

    A class names its feature modules in order (``_stages``, module paths; each Sequential among them is one
    checkpointed stage; ``features.*``: that Sequential's children are) and its last linear layer
    (``_classifier``: the modules before it in the same Sequential run after pooling). forward is forward_head(forward_features(x)): the function the class had, the
    same modules called (their hooks fire); checkpointing recomputes each stage in the backward pass.
    """

    _stages: tuple[str, ...] = ()
    _classifier: str = "fc"
    grad_checkpointing = False

    def forward_features(self: Any, x: Tensor) -> Tensor:
        """The last stage's feature map (before pooling)."""
        for path in self._stages:
            module = self.get_submodule(path.removesuffix(".*"))
            if not (self.grad_checkpointing and self.training and isinstance(module, nn.Sequential)):
                x = module(x)  # the stem's single layers too: an in-place ReLU must not rewrite a saved output
                continue
            for step in (module if path.endswith(".*") else [module]):
                # Non-reentrant: the gradient reaches the parameters whatever the input's requires_grad.
                x = checkpoint(step, x, use_reentrant=False)
        return x

    def forward_head(self: Any, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool and classify a feature map; ``pre_logits=True``: the pooled features, before the last linear."""
        pool = getattr(self, "avgpool", None)
        x = pool(x) if isinstance(pool, nn.Module) else nn.functional.adaptive_avg_pool2d(x, 1)
        parent, _, last = self._classifier.rpartition(".")
        for name, module in (self.get_submodule(parent).named_children() if parent else ()):
            if name == last:
                break
            x = module(x)
        x = x.flatten(1)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self: Any) -> nn.Module:
        """The last linear layer (an Identity after ``reset_classifier(0)``)."""
        return self.get_submodule(self._classifier)

    def reset_classifier(self: Any, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh last linear layer for ``num_classes`` (0: none, the model returns the pooled features)."""
        if global_pool not in (None, "avg"):
            raise ConfigError(f"{type(self).__name__} pools by average only: call reset_classifier(num_classes) "
                              f"or pass global_pool='avg', not {global_pool!r}")
        old = self.get_classifier()
        features = old.in_features if isinstance(old, nn.Linear) else self.num_features
        parent, _, name = self._classifier.rpartition(".")
        setattr(self.get_submodule(parent), name, nn.Linear(features, num_classes) if num_classes else nn.Identity())
        self.num_features, self.num_classes = features, num_classes

    def set_grad_checkpointing(self: Any, enable: bool = True) -> None:
        """Recompute each feature stage in the backward pass (torch.utils.checkpoint) instead of storing it."""
        self.grad_checkpointing = enable
