"""CalibrationConfig (how calibrate calibrates, its defaults and precedence) and what calibrate reports."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kdna_fx.errors import ConfigError
from kdna_fx.tables import format_table


MODES: tuple[str, ...] = ("bn", "layerwise", "distill")
TRAIN: tuple[str, ...] = ("adapters", "parents", "all")
LAYER_LOSSES: tuple[str, ...] = ("auto", "mse", "gram")
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibrate() calibrates. ``CalibrationConfig()`` is the recipe chosen on a validation split of the
    training images (docs/conversion.md); derive variants with ``config.replace(steps=100)``.

    Precedence: ``calibrate(..., config=None)`` uses ``CalibrationConfig()``; a config you pass is used whole,
    each field at the value it holds (there are no keyword overrides beside it).

    - ``modes``: any of "bn", "layerwise", "distill" (a string for one), always run in that order.
    - ``steps``, ``lr``, ``temperature``: distillation's Adam steps, learning rate and softmax temperature.
    - ``batch_size``: images per step (>= 2: gate BatchNorms need two samples); a tensor of images is cut into
      batches of this size, an iterable is used as it batches.
    - ``train``: what "distill" trains: "adapters" (adapters and norm affines), "parents" (those and the
      shared kernels) or "all" (every parameter: the only choice for a student that was not transformed, a
      pruned or factorised model). ``weight_lr``: the rate of the weights "parents"/"all" add (None: ``lr``).
    - ``features``: weight of the per-layer loss on the outputs of the norm layers found at the same path in
      both models (0: match the final outputs only). ``layer_loss`` says how a pair is compared: "mse" (the
      normalised mean squared error; pairs whose shapes differ are skipped), "gram" (2 * (1 - linear CKA) of
      the two outputs over the batch, which compares the sample-by-sample similarity structure and so needs no
      channel correspondence: a pruned layer is compared with its full-width original), or "auto" (default:
      "mse" where the shapes match, "gram" where they differ).
    - ``layerwise_steps``, ``layerwise_lr``: Adam steps and rate per child in "layerwise".
    - ``norms``: "train" (BatchNorms use batch statistics while distilling, re-estimated at the end) or
      "eval" (frozen statistics).
    - ``seed``: shuffling and every random draw; the same seed gives the same result. ``progress``: tqdm bars.
    """

    modes: tuple[str, ...] | str = ("bn", "distill")
    steps: int = 300
    lr: float = 1e-2
    batch_size: int = 64
    temperature: float = 1.0
    train: str = "parents"
    weight_lr: float | None = 1e-3
    features: float = 1.0
    layer_loss: str = "auto"
    layerwise_steps: int = 50
    layerwise_lr: float = 1e-2
    norms: str = "train"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        modes = (self.modes,) if isinstance(self.modes, str) else tuple(self.modes)
        object.__setattr__(self, "modes", modes)
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise ConfigError(f"CalibrationConfig: unknown mode(s) {unknown or list(modes)}; modes are {MODES} "
                              f"(any of them, run in that order)")
        if self.train not in TRAIN:
            raise ConfigError(f"CalibrationConfig: train must be one of {TRAIN}, got {self.train!r}")
        if self.layer_loss not in LAYER_LOSSES:
            raise ConfigError(f"CalibrationConfig: layer_loss must be one of {LAYER_LOSSES}, got {self.layer_loss!r}")
        if self.norms not in ("train", "eval"):
            raise ConfigError(f"CalibrationConfig: norms must be 'train' or 'eval', got {self.norms!r}")
        for name in ("steps", "layerwise_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"CalibrationConfig: {name} must be an int >= 0, got {value!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ConfigError(f"CalibrationConfig: batch_size must be an int >= 2 (gate BatchNorms need 2 "
                              f"samples), got {self.batch_size!r}")
        if not self.features >= 0:
            raise ConfigError(f"CalibrationConfig: features must be >= 0 (0: match the outputs only), "
                              f"got {self.features!r}")
        rates = (self.lr, self.layerwise_lr, self.temperature, 1.0 if self.weight_lr is None else self.weight_lr)
        if not all(isinstance(v, (int, float)) and v > 0 for v in rates):
            raise ConfigError(f"CalibrationConfig: lr, weight_lr, layerwise_lr and temperature must be > 0, got "
                              f"{self.lr}, {self.weight_lr}, {self.layerwise_lr}, {self.temperature}")

    def replace(self, **changes: Any) -> "CalibrationConfig":
        """A copy with ``changes`` applied (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"CalibrationConfig has no field(s) {unknown}; fields are "
                              f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "modes": list(self.modes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CalibrationConfig":
        return cls().replace(**d)


@dataclass
class ModeResult:
    """One calibration mode: how long it took and how close ``kmodel`` was to the reference before and after.

    ``agreement`` is the fraction of images whose top-1 class (argmax over dim 1) is the reference's (None
    when the output is not 2-D logits); ``error`` is the relative RMS output error,
    sqrt(sum |k - r|^2 / sum |r|^2) over the data. ``children`` (layerwise only) maps each child to its
    relative output error before and after its fit.
    """

    mode: str
    seconds: float
    steps: int
    agreement_before: float | None
    agreement_after: float | None
    error_before: float
    error_after: float
    children: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class CalibrationReport:
    """What calibrate() did: one ModeResult per mode, in the order they ran."""

    modes: list[ModeResult]
    images: int
    seed: int
    config: CalibrationConfig | None = None

    @property
    def agreement_before(self) -> float | None:
        return self.modes[0].agreement_before if self.modes else None

    @property
    def agreement_after(self) -> float | None:
        return self.modes[-1].agreement_after if self.modes else None

    @property
    def seconds(self) -> float:
        return sum(m.seconds for m in self.modes)

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "seed": self.seed, "seconds": self.seconds,
                "config": self.config.to_dict() if self.config else None,
                "modes": [dataclasses.asdict(m) for m in self.modes]}

    def __str__(self) -> str:
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        rows = [[m.mode, m.steps, f"{m.seconds:.1f}", pct(m.agreement_before), pct(m.agreement_after),
                 f"{m.error_before:.4f}", f"{m.error_after:.4f}"] for m in self.modes]
        out = format_table(["mode", "steps", "seconds", "agreement before", "after", "error before", "after"],
                           rows, title=f"calibration on {self.images} images (seed {self.seed})")
        for m in self.modes:
            if m.children:
                out += "\n\n" + format_table(["child", "error before", "after"],
                                             [[c, f"{b:.4f}", f"{a:.4f}"] for c, (b, a) in m.children.items()],
                                             title=f"{m.mode}: per-child relative output error")
        return out
