"""The frontier study's rows: each a name defined in ``ROW_TABLE`` as a zoo name with its tag and create_model
options (no grammar of names), the presets, and building and costing a row."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import kdna_fx
from kdna_fx import peers
from kdna_fx.models import create_model
from kdna_fx.reporting import count_macs

# Queue order, most informative first: the width-0.25 head-to-head and the cheap end of the plain curve, then
# the relaxed children and the peers, then the expensive width-0.375 rows. Seeds are the outer loop.
# The peers run at width 0.125: at 0.25 their per-sample grouped convolutions trained 4-6x slower than the plain
# net on the 2-core CPU (6.2-9.4 s per step of 128, 13-19 h per run), at 0.125 about as fast as plain-w0.25.
# plain-w0.5 came last: both width-0.375 KernelDNA rows are slower at batch 1 than plain-w0.375, so without a
# wider plain net the curve ends before their latency and the peers target cannot be read for them.
ROWS = ["plain-w0.25", "replace-w0.25", "kdna-w0.25", "plain-w0.125", "plain-w0.1875", "relaxed-r4-w0.25",
        "condconv-k4-w0.125", "dyconv-k4-w0.125", "odconv-k1-w0.125", "plain-w0.375", "replace-w0.375",
        "kdna-w0.375", "plain-w0.5"]

PRESETS: dict[str, dict[str, Any]] = {
    "frontier": dict(rows=ROWS, seeds=[0, 1, 2], epochs=15, train_subset=0, warmup_epochs=1.0,
                     out="bench/results/frontier", run_root="runs/frontier"),
    # The former bench/accuracy_study.py (results, retired for want of a commit, in bench/results/retired/accuracy_fashion_mnist.md): 10k images,
    # 3 epochs; width 0.1725 is the plain net whose parameter count is closest to replace-w0.25's.
    "short": dict(rows=["plain-w0.25", "replace-w0.25", "kdna-w0.25", "plain-w0.1725"], seeds=[0, 1, 2], epochs=3,
                  train_subset=10_000, warmup_epochs=0.25, out="bench/results/frontier_short",
                  run_root="runs/frontier_short"),
}

KINDS = {"plain": "plain ResNet-18", "replace": "replace mode", "kdna": "reference topology",
         "relaxed": "relaxed children", "condconv": "CondConv", "dyconv": "DY-Conv", "odconv": "ODConv"}
"""The tags a row may build, and how its label names them."""
KERNELDNA = ("replace", "kdna", "relaxed")
PEERS = ("condconv", "dyconv", "odconv")
KERNELS = {"condconv": "experts", "dyconv": "kernels", "odconv": "kernel_num"}
"""The option of each peer tag that sets its number of kernels (the K of the label)."""
STUDY_OPTIONS: dict[str, Any] = dict(num_classes=10, in_chans=1, small_stem=True)
"""The create_model options of every row: Fashion-MNIST's 10 classes and 1x28x28 images, the small stem."""


# ------------------------------------------------------------------------------------------------ rows


@dataclass(frozen=True)
class Row:
    """One row of the study: its name (the key of its records and timings), the zoo name it builds
    (``<arch>.<tag>``) and its ``create_model`` options beyond ``STUDY_OPTIONS``, as sorted (key, value) pairs."""

    name: str
    model: str
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, name: str) -> "Row":
        """The row ``name`` of ``ROW_TABLE``."""
        if name not in ROW_TABLE:
            raise SystemExit(f"unknown row {name!r}: the rows are {', '.join(ROW_TABLE)} (a new row is one "
                             f"define(name, model, **options) line in bench/frontier_study.py)")
        return ROW_TABLE[name]

    @property
    def kind(self) -> str:
        """The tag of the zoo name: plain, replace, kdna, relaxed or a peer."""
        return self.model.rpartition(".")[2]

    @property
    def width(self) -> float:
        return dict(self.options)["width"]

    def kwargs(self) -> dict[str, Any]:
        """Everything ``create_model(self.model, **...)`` gets."""
        return {**STUDY_OPTIONS, **dict(self.options)}

    @property
    def label(self) -> str:
        options = dict(self.options)
        extra = (f" rank {options['rank']}" if self.kind == "relaxed"
                 else f" K={options[KERNELS[self.kind]]}" if self.kind in KERNELS else "")
        return f"{KINDS[self.kind]}{extra}, width {self.width:g}"

    def spec(self) -> dict[str, Any]:
        """What goes into TrainConfig.model (checked on resume) and the run record: the row and its zoo name
        and options, so ``kdna_fx.models.create_model(spec["name"], **options)`` rebuilds the model."""
        return {"row": self.name, "name": self.model, **self.kwargs()}


ROW_TABLE: dict[str, Row] = {}


def define(name: str, model: str, **options: Any) -> Row:
    """Add the row ``name``: ``create_model(model, **STUDY_OPTIONS, **options)``. Checks the tag and the option
    names (``kdna_fx.models.model_options``) here; the values are checked by create_model when it builds."""
    from kdna_fx.models import model_options

    tag = model.rpartition(".")[2]
    if tag not in KINDS or "width" not in options:
        raise ValueError(f"row {name!r}: the study's rows are {', '.join(f'resnet18.{k}' for k in KINDS)} "
                         f"with a width, got {model!r} with {sorted(options)}")
    unknown = sorted((set(STUDY_OPTIONS) | set(options)) - set(model_options(model)))
    if unknown:
        raise ValueError(f"row {name!r}: {model} does not take {unknown}; it takes {model_options(model)}")
    if tag in PEERS and KERNELS[tag] not in options:
        raise ValueError(f"row {name!r}: a peer row names its kernels ({KERNELS[tag]}=K)")
    ROW_TABLE[name] = Row(name, model, tuple(sorted(options.items())))
    return ROW_TABLE[name]


SCRATCH = {"init": "scratch"}  # the peers' experts drawn from scratch, as their papers train
for _w in (0.125, 0.1725, 0.1875, 0.25, 0.375, 0.5):
    define(f"plain-w{_w:g}", "resnet18.plain", width=_w)
for _w in (0.25, 0.375):
    define(f"replace-w{_w:g}", "resnet18.replace", width=_w)
    define(f"kdna-w{_w:g}", "resnet18.kdna", width=_w)
define("relaxed-r4-w0.25", "resnet18.relaxed", width=0.25, rank=4)
define("condconv-k4-w0.125", "resnet18.condconv", width=0.125, experts=4, **SCRATCH)
define("dyconv-k4-w0.125", "resnet18.dyconv", width=0.125, kernels=4, **SCRATCH)
define("odconv-k1-w0.125", "resnet18.odconv", width=0.125, kernel_num=1, **SCRATCH)


def build(row: Row, *, anneal_steps: int = 0) -> nn.Module:
    """A freshly initialised model for ``row`` (seed torch first): ``create_model(row.model, **row.kwargs())``.
    ``anneal_steps``: DY-Conv's temperature schedule (a training schedule, not a variant)."""
    model = create_model(row.model, **row.kwargs())
    if row.kind == "dyconv" and anneal_steps:
        anneal_temperature(model, start=30.0, end=1.0, steps=anneal_steps)
    return model


def anneal_temperature(model: nn.Module, *, start: float, end: float, steps: int) -> None:
    """DY-Conv's schedule: temperature linear from ``start`` to ``end`` over the first ``steps`` training forwards.

    The step count is a buffer of the model, so it is in every checkpoint and a resumed run continues the
    schedule exactly (setting the temperature between epochs would be lost: the checkpoint is written first).
    """
    model.register_buffer("anneal_step", torch.zeros((), dtype=torch.long))

    def before_forward(module: nn.Module, _args: Any) -> None:
        if module.training:
            step = int(module.anneal_step)
            peers.set_temperature(module, end if step >= steps else start + (end - start) * step / steps)
            module.anneal_step += 1

    peers.set_temperature(model, start)
    model.register_forward_pre_hook(before_forward)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a shared parent kernel is one Parameter: counted once


def cost(row: Row) -> dict[str, Any]:
    """Parameters and MACs of one 1x28x28 image; ``extra_macs``: inside KernelDNA gates or the peers' heads and
    kernel mixtures (the peers' per-sample conv counts as the conv it replaces)."""
    torch.manual_seed(0)
    model = build(row).eval()
    x = torch.randn(1, 1, 28, 28)
    macs, extra = count_macs(model, x)
    return {"params": n_params(model), "macs": macs, "extra_macs": extra}


def deployable(row: Row) -> nn.Module:
    """What one would ship, in eval mode: KernelDNA rows folded (kdna_fx.fold), the others as they are."""
    model = build(row).eval()
    return kdna_fx.fold(model) if row.kind in KERNELDNA else model
