"""Label-free calibration of a transformed model against the trained model it came from.

    kmodel = kdna_fx.transform(trained)
    result = kdna_fx.calibrate(kmodel, images, reference=trained)      # CalibrationConfig() defaults
    result = kdna_fx.calibrate(kmodel, images, kdna_fx.CalibrationConfig(steps=100), reference=trained)
    print(result)                                                     # agreement and output error per mode

Modes, run in this order when several are asked:

- ``"bn"``: re-estimate the running statistics of every BatchNorm of ``kmodel`` on the data (cumulative
  average, only the BatchNorms in train mode, no gradients).
- ``"layerwise"``: child by child in graph order, fit that child's adapter (F, S, gate) so that its output,
  on the input the *kmodel* gives it, matches the output of the conv at the same path in ``reference`` on
  the reference's own input; BatchNorm statistics are re-estimated after every child.
- ``"distill"``: end-to-end distillation of ``kmodel``'s outputs to the reference's (KL divergence on
  logits with a temperature, mean squared error for any other output). ``train`` says what it trains:
  ``"adapters"`` (every adapter parameter and every norm's affine parameters), ``"parents"`` (those and
  the shared parent kernels) or ``"all"`` (every parameter). With ``"all"`` any student works, transformed
  or not (a pruned or factorised model distilled the same way, for a like-for-like comparison).

The reference is only read: it runs in eval mode under ``torch.no_grad`` and every module's training flag
is restored afterwards.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .adapters import ChildAdapter, adapter_parameters
from .errors import CalibrationError, ConfigError, KDNAError, KDNATypeError
from .utils import KeptModes
from .datamodel import child_nodes, graph_of, interpreted, record_of, tag_of
from .tables import format_table

MODES: tuple[str, ...] = ("bn", "layerwise", "distill")
TRAIN: tuple[str, ...] = ("adapters", "parents", "all")
LAYER_LOSSES: tuple[str, ...] = ("auto", "mse", "gram")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


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


# ----------------------------------------------------------------------------------------------- data


def _images(item: Any, where: str) -> Tensor:
    if isinstance(item, (tuple, list)) and item:
        item = item[0]  # (images, labels, ...): labels are ignored
    if isinstance(item, dict):
        raise CalibrationError(f"calibrate: {where} is a dict; data must yield image tensors [N, C, H, W] or "
                               f"(images, labels) tuples")
    if not isinstance(item, Tensor):
        raise CalibrationError(f"calibrate: {where} is a {type(item).__name__}, not a tensor of images "
                               f"[N, C, H, W] (nor an (images, labels) tuple)")
    if item.dim() != 4:
        raise CalibrationError(f"calibrate: {where} has shape {tuple(item.shape)}; images must be a 4-D batch "
                               f"[N, C, H, W] (add the batch dimension with x.unsqueeze(0))")
    if not item.is_floating_point():
        raise CalibrationError(f"calibrate: {where} has dtype {item.dtype}; images must be floating point "
                               f"(convert with x.float() and the normalisation the model was trained with)")
    if item.shape[0] == 0:
        raise CalibrationError(f"calibrate: {where} is an empty batch (shape {tuple(item.shape)})")
    return item


class _Data:
    """Batches of images from a tensor (shuffled by our own generator) or from any iterable (its own order)."""

    def __init__(self, data: Any, batch_size: int, device: torch.device, dtype: torch.dtype):
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        if isinstance(data, Tensor):
            self.tensor: Tensor | None = _images(data, "data")
            self.iterable = None
            self.count = self.tensor.shape[0]
        else:
            if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
                raise CalibrationError(f"calibrate: data must be a tensor of images [N, C, H, W] or an iterable "
                                       f"(a DataLoader) of them, got {type(data).__name__}")
            self.tensor, self.iterable = None, data
            self.count = sum(b.shape[0] for b in self._iterate())
            if self.count == 0:
                raise CalibrationError("calibrate: data is empty (the iterable yielded no batch); pass at least "
                                       "one image")

    def _iterate(self) -> Iterator[Tensor]:
        for i, item in enumerate(self.iterable):  # type: ignore[union-attr]
            yield _images(item, f"data item #{i}")

    def _prepare(self, x: Tensor) -> Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    def batches(self, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """One pass over the data; a tensor is shuffled when ``generator`` is given."""
        if self.tensor is not None:
            order = (torch.randperm(self.count, generator=generator) if generator is not None
                     else torch.arange(self.count))
            for i in range(0, self.count, self.batch_size):
                yield self._prepare(self.tensor[order[i:i + self.batch_size]])
        else:
            for x in self._iterate():
                yield self._prepare(x)

    def stream(self, generator: torch.Generator) -> Iterator[Tensor]:
        """Endless shuffled batches (epochs one after another), batches of one image skipped."""
        while True:
            for x in self.batches(generator):
                if x.shape[0] > 1:
                    yield x


# ----------------------------------------------------------------------------------------------- helpers


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _output(y: Any, who: str) -> Tensor:
    if isinstance(y, Tensor):
        return y
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], Tensor):
        return y[0]
    raise CalibrationError(f"calibrate: {who} returned a {type(y).__name__}; calibrate needs a tensor output "
                           f"(logits or a feature map)")


class _Runner:
    def __init__(self, kmodel: nn.Module, reference: nn.Module, data: _Data):
        self.kmodel, self.reference, self.data = kmodel, reference, data
        self.ref_device, self.ref_dtype = _device_dtype(reference)

    @torch.no_grad()
    def ref(self, x: Tensor) -> Tensor:
        self.reference.eval()
        y = _output(self.reference(x.to(device=self.ref_device, dtype=self.ref_dtype)), "the reference")
        return y.to(device=x.device, dtype=x.dtype)

    def logits_like(self, y: Tensor) -> bool:
        return y.dim() == 2

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, float]:
        """(top-1 agreement or None, relative RMS output error) of kmodel in eval mode over the data."""
        with KeptModes(self.kmodel):
            self.kmodel.eval()
            same = total = 0
            diff = norm = 0.0
            logits = True
            for x in self.data.batches():
                r, k = self.ref(x), _output(self.kmodel(x), "kmodel")
                logits = logits and self.logits_like(r)
                if logits:
                    same += int((r.argmax(1) == k.argmax(1)).sum())
                total += x.shape[0]
                diff += float((k - r).double().pow(2).sum())
                norm += float(r.double().pow(2).sum())
        return (same / total if logits else None), (diff / max(norm, 1e-300)) ** 0.5

    def check_shapes(self) -> None:
        x = next(self.data.batches())[:2]
        try:
            r = self.ref(x)
        except (RuntimeError, ValueError) as e:
            raise CalibrationError(f"calibrate: the reference cannot run on the data (batch of shape "
                                   f"{tuple(x.shape)}): {e}") from e
        with KeptModes(self.kmodel), torch.no_grad():
            self.kmodel.eval()
            try:
                k = _output(self.kmodel(x), "kmodel")
            except (RuntimeError, ValueError) as e:
                raise CalibrationError(f"calibrate: kmodel cannot run on the data (batch of shape "
                                       f"{tuple(x.shape)}): {e}") from e
        if k.shape != r.shape:
            raise CalibrationError(f"calibrate: the reference's output has shape {tuple(r.shape)} but kmodel's has "
                                   f"{tuple(k.shape)} on the same batch; reference must be the model kmodel was "
                                   f"transformed from")


def _shared_tensors(kmodel: nn.Module, reference: nn.Module) -> list[str]:
    ref = {t.data_ptr() for t in list(reference.parameters()) + list(reference.buffers()) if t.numel()}
    named = list(kmodel.named_parameters()) + list(kmodel.named_buffers())
    return [n for n, t in named if t.numel() and t.data_ptr() in ref]


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def _reestimate_bn(kmodel: nn.Module, data: _Data, bar: Any = None) -> int:
    """Cumulative-average BatchNorm statistics over one pass of the data; returns the batches used."""
    bns = _batchnorms(kmodel)
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    steps = 0
    with KeptModes(kmodel):
        kmodel.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        try:
            for x in data.batches():
                if x.shape[0] < 2:
                    continue  # a gate's BatchNorm1d cannot take one sample; statistics of one image are poor anyway
                kmodel(x)
                steps += 1
                if bar is not None:
                    bar.update(1)
        finally:
            for bn, m in zip(bns, momenta):
                bn.momentum = m
    return steps


class _Stop(Exception):
    def __init__(self, value: Tensor):
        super().__init__("stop")
        self.value = value  # not in args: fx.Interpreter rewrites the args of exceptions it passes on


class _Capture(fx.Interpreter):
    """Runs a GraphModule up to one child_conv node and returns that node's input."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node):
        super().__init__(gm)
        self.target_node = node

    def run_node(self, n: fx.Node) -> Any:
        if n is self.target_node:
            args, _ = self.fetch_args_kwargs_from_env(n)
            raise _Stop(args[0])
        return super().run_node(n)


@dataclass
class _Child:
    """One child conv of a transformed model: a node of its graph, or a module-swapped ChildAdapter."""

    name: str
    adapter: ChildAdapter
    weight: Tensor
    """The parent kernel it reads."""
    gm: fx.GraphModule | None = None
    node: fx.Node | None = None

    def input(self, kmodel: nn.Module, x: Tensor) -> Tensor:
        """The child's input when ``kmodel`` runs on x."""
        def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
            raise _Stop(args[0])

        try:
            if self.gm is not None:
                with interpreted(self.gm, _Capture(self.gm, self.node)):  # type: ignore[arg-type]
                    kmodel(x)
            else:
                handle = self.adapter.register_forward_pre_hook(stop)
                try:
                    kmodel(x)
                finally:
                    handle.remove()
        except _Stop as stopped:
            return stopped.value
        raise KDNAError(f"calibrate: the child conv {self.name} was not reached")


def _children(kmodel: nn.Module) -> list[_Child]:
    """Every child conv in graph order (rewritten graph) or module order (module swap)."""
    gm = graph_of(kmodel)
    if gm is not None:
        return [_Child(tag_of(n).child, gm.get_submodule(tag_of(n).adapter), _parent_weight(gm, n), gm, n)
                for n in child_nodes(gm)]
    return [_Child(name, m, m.parent_kernel) for name, m in getattr(kmodel, "_orig_mod", kmodel).named_modules()
            if isinstance(m, ChildAdapter) and m.folded_weight is None]


def _parent_weight(gm: fx.GraphModule, node: fx.Node) -> Tensor:
    weight = node.args[1]
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return gm.get_parameter(weight.target) if isinstance(weight.target, str) else weight.target
    raise KDNAError(f"calibrate: cannot find the parent kernel of child node {node.name}")  # pragma: no cover


def _layerwise(kmodel: nn.Module, runner: _Runner, data: _Data, *, steps: int, lr: float,
               generator: torch.Generator, bar: Any) -> tuple[int, dict[str, tuple[float, float]]]:
    reference = runner.reference
    ref_modules = dict(reference.named_modules())
    done, errors = 0, {}
    for child in _children(kmodel):
        name, adapter = child.name, child.adapter
        target = ref_modules.get(name)
        if not isinstance(adapter, ChildAdapter) or not isinstance(target, nn.Conv2d):
            continue  # no conv at that path in the reference: nothing to match
        weight = child.weight.detach()
        # Inputs from kmodel (so each child corrects the error before it), targets from the reference.
        captured: list[Tensor] = []
        hook = target.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
        pairs = []
        try:
            with KeptModes(kmodel), torch.no_grad():
                kmodel.eval()
                for x in data.batches():
                    captured.clear()
                    runner.ref(x)
                    pairs.append((child.input(kmodel, x), captured[0].to(x.device, x.dtype)))
        finally:
            hook.remove()
        params = [p for p in adapter.parameters() if p is not adapter.bias and p is not adapter.held_weight]
        if not params:
            continue

        def error() -> float:
            with torch.no_grad():
                d = sum(float((adapter(i, weight) - t).double().pow(2).sum()) for i, t in pairs)
                n = sum(float(t.double().pow(2).sum()) for _, t in pairs)
            return (d / max(n, 1e-300)) ** 0.5

        with KeptModes(kmodel):
            kmodel.eval()  # gate norms use their running statistics: a fixed affine while fitting
            before = error()
            opt = torch.optim.Adam(params, lr=lr)
            for _ in range(steps):
                i, t = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
                loss = F.mse_loss(adapter(i, weight), t) / t.pow(2).mean().clamp_min(1e-12)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                bar.update(1)
            errors[name] = (before, error())
        _reestimate_bn(kmodel, data)
    return done, errors


def gram_loss(k: Tensor, r: Tensor) -> Tensor:
    """2 * (1 - linear CKA) between two batches of features [B, ...] of any widths: the squared distance of
    their centred sample-by-sample Gram matrices, each scaled to unit norm (0: the same similarity structure)."""
    gk, gr = (_centred_gram(t) for t in (k, r))
    return (gk / gk.norm().clamp_min(1e-12) - gr / gr.norm().clamp_min(1e-12)).pow(2).sum()


def _centred_gram(t: Tensor) -> Tensor:
    x = t.flatten(1)
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


class _Taps:
    """Forward hooks on the norm layers found at the same path in both models: their outputs, per forward."""

    def __init__(self, kmodel: nn.Module, reference: nn.Module, layer_loss: str = "auto"):
        mine = dict(kmodel.named_modules())
        self.layer_loss = layer_loss
        self.names = [n for n, m in reference.named_modules()
                      if isinstance(m, _NORMS) and isinstance(mine.get(n), type(m))]
        self.outputs: dict[str, dict[str, Tensor]] = {"k": {}, "r": {}}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(side, n))
                        for side, model in (("k", kmodel), ("r", reference)) for n in self.names]

    def _hook(self, side: str, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self.outputs[side][name] = out
        return hook

    def _term(self, k: Tensor, r: Tensor) -> Tensor | None:
        same = k.shape == r.shape
        if self.layer_loss == "gram" or (self.layer_loss == "auto" and not same):
            return gram_loss(k, r) if k.shape[0] == r.shape[0] else None
        return F.mse_loss(k, r) / r.pow(2).mean().clamp_min(1e-12) if same else None

    def loss(self) -> Tensor | None:
        """Mean over the taps of the per-pair loss (``layer_loss``); a pair "mse" cannot compare is skipped."""
        terms = [t for n in self.names
                 for k, r in [(self.outputs["k"].get(n), self.outputs["r"].get(n))]
                 if k is not None and r is not None
                 for t in [self._term(k, r)] if t is not None]
        self.outputs = {"k": {}, "r": {}}
        return torch.stack(terms).mean() if terms else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _distill(kmodel: nn.Module, runner: _Runner, data: _Data, config: CalibrationConfig, *,
             generator: torch.Generator, bar: Any) -> int:
    steps, lr, temperature, train = config.steps, config.lr, config.temperature, config.train
    params: dict[int, nn.Parameter] = {id(p): p for _, p in adapter_parameters(kmodel)}
    for m in kmodel.modules():
        if isinstance(m, _NORMS):
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if isinstance(p, nn.Parameter):
                    params[id(p)] = p
    adapters_and_norms = set(params)
    if train == "parents":
        for child in _children(kmodel):
            p = child.weight
            params[id(p)] = p
    if train == "all":
        params = {id(p): p for p in kmodel.parameters()}
    if not params:
        return 0
    flags = [(p, p.requires_grad) for p in kmodel.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in params)
    light = [p for p in params.values() if id(p) in adapters_and_norms]
    weights = [p for p in params.values() if id(p) not in adapters_and_norms]
    groups = [{"params": light}] if light else []
    groups += [{"params": weights, "lr": config.weight_lr or lr}] if weights else []
    opt = torch.optim.Adam(groups, lr=lr)
    done = 0
    taps = _Taps(kmodel, runner.reference, config.layer_loss) if config.features > 0 else None
    try:
        with KeptModes(kmodel):
            kmodel.eval()
            if config.norms == "train":
                for bn in _batchnorms(kmodel):
                    bn.train()
            for x in data.stream(generator):
                if done >= steps:
                    break
                r = runner.ref(x)
                k = _output(kmodel(x), "kmodel")
                if r.dim() == 2:
                    t = temperature
                    loss = F.kl_div(F.log_softmax(k / t, 1), F.log_softmax(r / t, 1), log_target=True,
                                    reduction="batchmean") * t * t
                else:
                    loss = F.mse_loss(k, r) / r.pow(2).mean().clamp_min(1e-12)
                inner = taps.loss() if taps is not None else None
                if inner is not None:
                    loss = loss + config.features * inner
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                bar.update(1)
    finally:
        if taps is not None:
            taps.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        opt.zero_grad(set_to_none=True)
    if config.norms == "train":
        _reestimate_bn(kmodel, data)
    return done


# ----------------------------------------------------------------------------------------------- public


def calibrate(kmodel: nn.Module, data: Any, config: CalibrationConfig | None = None, *,
              reference: nn.Module) -> CalibrationReport:
    """Calibrate a transformed model to the trained ``reference`` it came from, with unlabeled ``data``.

    ``data``: a tensor of images [N, C, H, W] (cut into ``config.batch_size`` batches, shuffled by
    ``config.seed``), or any iterable (a DataLoader) of image batches or (images, labels) tuples, used in its
    own order (labels are ignored). ``config``: a CalibrationConfig (None: its defaults, the measured recipe).
    ``kmodel`` is changed in place and its modules' train/eval flags are restored; ``reference`` is never
    changed. With ``config.train="all"`` any student works (a pruned or factorised model too). Returns a
    CalibrationReport.
    """
    if config is None:
        config = CalibrationConfig()
    if not isinstance(config, CalibrationConfig):
        raise KDNATypeError(f"calibrate: config must be a kdna_fx.CalibrationConfig, got {type(config).__name__} "
                            f"(options are its fields: calibrate(model, data, CalibrationConfig(steps=100), "
                            f"reference=original))")
    inner = getattr(kmodel, "_orig_mod", kmodel)
    if not isinstance(inner, nn.Module):
        raise KDNATypeError(f"calibrate: kmodel must be an nn.Module, got {type(kmodel).__name__}")
    if config.train != "all" or "layerwise" in config.modes:
        try:
            record_of(inner)
        except KDNAError as exc:
            raise KDNAError(f"{exc}. calibrate(train={config.train!r}) and layerwise mode need a transformed "
                            f"model; to distill any other student (pruned, factorised) pass "
                            f"CalibrationConfig(train='all') with modes 'bn' and/or 'distill'") from None
    if not isinstance(reference, nn.Module):
        raise KDNATypeError(f"calibrate: reference must be the original trained nn.Module, got "
                            f"{type(reference).__name__}")
    if reference is inner:
        raise CalibrationError("calibrate: reference is kmodel itself; pass the original model kmodel was "
                               "transformed from")
    shared = _shared_tensors(inner, reference)
    if shared:
        raise CalibrationError(f"calibrate: kmodel shares {len(shared)} tensor(s) with reference (e.g. "
                               f"{shared[:3]}), as after transform(..., inplace=True); calibrating would change "
                               f"the reference. Transform without inplace=True")
    order = [m for m in MODES if m in config.modes]
    device, dtype = _device_dtype(inner)
    feed = _Data(data, config.batch_size, device, dtype)
    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), KeptModes(reference):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        runner = _Runner(inner, reference, feed)
        runner.check_shapes()
        agreement, error = runner.evaluate()
        results = []
        n_children = len(_children(inner))
        for mode in order:
            total = {"bn": None, "layerwise": config.layerwise_steps * n_children, "distill": config.steps}[mode]
            with tqdm(total=total, desc=f"calibrate {mode}", disable=not config.progress, leave=False) as bar:
                start = time.perf_counter()
                children: dict[str, tuple[float, float]] = {}
                if mode == "bn":
                    done = _reestimate_bn(inner, feed, bar)
                elif mode == "layerwise":
                    done, children = _layerwise(inner, runner, feed, steps=config.layerwise_steps,
                                                lr=config.layerwise_lr, generator=generator, bar=bar)
                else:
                    done = _distill(inner, runner, feed, config, generator=generator, bar=bar)
                seconds = time.perf_counter() - start
            after_agreement, after_error = runner.evaluate()
            results.append(ModeResult(mode, seconds, done, agreement, after_agreement, error, after_error, children))
            agreement, error = after_agreement, after_error
    return CalibrationReport(results, feed.count, config.seed, config)
