"""Converting a trained model: transform -> calibrate -> (optional) fine-tune, scored after every step.

    result = kdna_fx.convert(trained, unlabeled_images, evaluate={"val": val_loader})
    result.model            # the calibrated KernelDNA model
    result.stages           # {"converted": {...}, "calibrated": {...}}: seconds and top-1 / agreement per split

``kdna convert`` (kdna_fx/cli/convert.py) runs this one function; a model made some other way (a pruned or
factorised copy) takes the same steps through ``calibrate`` and ``score`` directly (bench/conversion_rows.py).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .api import plan_of, transform
from .calibration import CalibrationConfig, CalibrationReport, calibrate
from .config import KDNAConfig
from .errors import ConfigError, KDNAError, KDNATypeError

STAGES: tuple[str, ...] = ("converted", "calibrated", "fine-tuned")


@dataclass
class ConversionResult:
    """What convert() did. ``stages`` maps each step that ran ("converted", "calibrated", "fine-tuned") to
    its ``seconds`` and, per split of ``evaluate``, the ``top1`` (%) and ``agreement`` with the original."""

    model: nn.Module
    stages: dict[str, dict[str, Any]]
    params: dict[str, int]
    calibration: CalibrationReport | None = None
    config: KDNAConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, JSON-ready."""
        return {"stages": self.stages, "params": self.params,
                "calibration": self.calibration.to_dict() if self.calibration else None,
                "config": self.config.to_dict() if self.config else None, **self.extra}


@torch.no_grad()
def score(model: nn.Module, original: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
    """Top-1 (%) on the labelled ``loader`` and agreement (fraction of images whose top-1 class is the
    original's), both models in eval mode."""
    model.eval()
    original.eval()
    correct = agree = count = 0
    for x, y in loader:
        out = model(x).argmax(1)
        correct += int((out == y).sum())
        agree += int((out == original(x).argmax(1)).sum())
        count += len(y)
    if count == 0:
        raise ConfigError("convert: an evaluation loader yielded no image")
    return {"top1": 100.0 * correct / count, "agreement": agree / count}


def n_params(model: nn.Module) -> int:
    """Parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def convert(original: nn.Module, images: Tensor, config: KDNAConfig | None = None, *,
            calibration: CalibrationConfig | None = None, init: str = "trained", plan: Any = None,
            finetune: Any = None, finetune_config: Any = None,
            evaluate: dict[str, Iterable[Any]] | None = None) -> ConversionResult:
    """Convert the trained ``original`` and calibrate it on the unlabeled ``images`` [N, C, H, W].

    The student is ``kdna_fx.transform(original, config, init=init, plan=plan)`` (``config`` None: the
    transform's defaults). The images also check the trace (docs/partial-tracing.md) and feed a
    ``policy="cka"`` plan. Then ``calibrate(student, images, calibration, reference=original)``, then, when ``finetune`` (a labelled Dataset) is given, ``kdna_fx.train.train`` with ``finetune_config``
    (a TrainConfig; None: 1 epoch, SGD lr 0.01, cosine, batch 128, fp32). After every step the model is scored
    on each loader of ``evaluate`` ({split name: loader of (images, labels)}). ``original`` is never changed.
    """
    if not isinstance(original, nn.Module):
        raise KDNATypeError(f"convert: original must be the trained nn.Module, got {type(original).__name__}")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] < 2:
        raise ConfigError(f"convert: images must be a tensor of at least 2 images [N, C, H, W], got "
                          f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    calibration = calibration or CalibrationConfig()
    original.eval()
    evaluate = evaluate or {}
    stages: dict[str, dict[str, Any]] = {}

    def scored(seconds: float, model: nn.Module) -> dict[str, Any]:
        return {"seconds": seconds, **{split: score(model, original, loader) for split, loader in evaluate.items()}}

    start = time.perf_counter()
    with torch.no_grad():
        data = images if config is not None and config.policy == "cka" else None
        student = transform(original, config, init=init, plan=plan, data=data, example_inputs=(images[:8],))
    if not plan_of(student).families:
        raise KDNAError(f"{type(original).__name__} has no conv kdna_fx can share under this config: nothing "
                        f"to convert (kdna_fx.plan(model, config) lists each conv with its reason)")
    stages["converted"] = scored(time.perf_counter() - start, student)

    start = time.perf_counter()
    report = calibrate(student, images, calibration, reference=original)
    stages["calibrated"] = scored(time.perf_counter() - start, student)

    if finetune is not None:
        from .train import TrainConfig, train

        finetune_config = finetune_config or TrainConfig(epochs=1, batch_size=128, lr=0.01, warmup_epochs=0,
                                                         amp="none", seed=calibration.seed,
                                                         progress=calibration.progress, log_every=10_000)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="kdna_convert_") as tmp:
            train(student, finetune, None, finetune_config, tmp)
        stages["fine-tuned"] = scored(time.perf_counter() - start, student)
    return ConversionResult(student, stages, {"original": n_params(original), "converted": n_params(student)},
                            report, config)
