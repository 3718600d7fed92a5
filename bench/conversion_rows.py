"""The conversion study's rows as data: ``ROWS`` maps a row's name (the key its records are filed under, e.g.
``prune@kdna-r4:lr=0.01``) to a ``Row`` spec, the method and the fields it sets; ``recipe`` makes that row's
student and the steps it takes. Names are keys, never parsed: every name a plan runs is built into the table.

A probe of a row (the validation grid of protocol 3) is the row with CalibrationConfig fields on top; its name is
the row's, ``:``, and the probe's text (``GRID`` and ``EXTRAS`` hold both, text and fields).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

import kdna_fx
from kdna_fx.calibration import CalibrationConfig
from kdna_fx.conversion import ConversionResult
from kdna_fx.models import sharing_config
from kdna_fx.train import train

from bench.common import REPO, factorise, matched, n_params, prune, score, shared_convs

# Protocol 3: the originals train on the 55,000 images left once the validation split is held out
# (bench.common.validation_split keeps exactly the prefix --train-subset keeps), then freeze into ORIGINALS_DIR.
ORIGINALS = {
    "resnet18_w025": "kdna train --model resnet18 --width 0.25 --epochs 5 --batch-size 128 --lr 0.1 "
                     "--warmup-epochs 0.25 --train-subset 55000 --seed 0 "
                     "--run-dir runs/conversion_original3_resnet18_w025 --no-progress",
    "mobilenet_v2_w050": "kdna train --model mobilenet_v2 --width 0.5 --epochs 5 --batch-size 128 --lr 0.1 "
                         "--warmup-epochs 0.25 --train-subset 55000 --seed 0 "
                         "--run-dir runs/conversion_original3_mobilenet_v2_w050 --no-progress",
}
ORIGINALS_DIR = os.path.join(REPO, "bench", "results", "conversion", "originals")  # committed weights + hashes
METHODS = ("original", "kdna", "prune", "svd", "prune+kdna")
STAGES = ("converted", "calibrated", "fine-tuned")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: ``method`` (one of METHODS) and its settings. ``rank``/``init``/``config`` (KDNAConfig fields
    over the architecture's sharing_config) and ``shuffle`` (a random plan's seed) make a KernelDNA student;
    ``matched_to`` names the row whose parameter count a pruned or factorised student matches; ``prune_ratio``
    prunes first (prune+kdna); ``calibration`` holds the row's CalibrationConfig fields over the study's and
    ``probe`` a probe's on top of those; ``arm`` is the row a probe belongs to (the verdicts and the grid
    compare arms)."""

    method: str
    arm: str = ""
    rank: int = 0
    init: str = "trained"
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    shuffle: int | None = None
    matched_to: str = ""
    prune_ratio: float = 0.0
    calibration: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    probe: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _kdna(rank: int, **fields: Any) -> Row:
    return Row("kdna", rank=rank, **fields)


BASE: dict[str, Row] = {
    "original": Row("original"),
    "kdna-r0": _kdna(0), "kdna-r4": _kdna(4), "kdna-r8": _kdna(8),
    "kdna-r4-centroid": _kdna(4, config={"parent": "centroid"}),
    "kdna-copy-r0": _kdna(0, init="copy"),  # the paper's from-scratch init, a control
    # Ablations: parts of the calibration switched off.
    "kdna-r4-adapters": _kdna(4, calibration={"train": "adapters"}),
    "kdna-r4-logits": _kdna(4, calibration={"features": 0.0}),
    "kdna-r4-adapters-logits": _kdna(4, calibration={"train": "adapters", "features": 0.0}),
    "kdna-r4-gram": _kdna(4, calibration={"layer_loss": "gram"}),
    # The CKA study's plans: one child per family, by position, by measured similarity, or shuffled.
    "kdna-r4-pairs": _kdna(4, config={"max_children": 1}),
    "kdna-r4-pairs-cka": _kdna(4, config={"max_children": 1, "policy": "cka"}),
    **{f"kdna-r4-pairs-random{k}": _kdna(4, config={"max_children": 1}, shuffle=k) for k in (1, 2, 3)},
    "prune30+kdna-r4": Row("prune+kdna", rank=4, prune_ratio=0.3),
    # The baselines matched to a row's parameter count.
    **{f"{baseline}@{target}": Row(baseline, matched_to=target)
       for target in ("kdna-r0", "kdna-r4", "kdna-r8", "prune30+kdna-r4") for baseline in ("prune", "svd")},
}

# The study's rows in report order, and the ablations (first seed only): the same conversion with parts of the
# calibration switched off.
STUDY_ROWS = ["original", "kdna-r4", "prune@kdna-r4", "svd@kdna-r4", "kdna-r0", "prune@kdna-r0", "svd@kdna-r0",
              "kdna-r8", "prune@kdna-r8", "svd@kdna-r8", "kdna-r4-centroid", "kdna-copy-r0", "prune30+kdna-r4",
              "prune@prune30+kdna-r4"]
ABLATION = ["kdna-r4-adapters-logits", "kdna-r4-logits", "kdna-r4-adapters", "kdna-r4-gram"]
# The verdicts: each KernelDNA row against the baselines matched to its parameter count.
HEADLINE = [("kdna-r4", "prune@kdna-r4"), ("kdna-r4", "svd@kdna-r4"), ("kdna-r0", "prune@kdna-r0"),
            ("kdna-r0", "svd@kdna-r0"), ("kdna-r8", "prune@kdna-r8"), ("kdna-r8", "svd@kdna-r8"),
            ("prune30+kdna-r4", "prune@prune30+kdna-r4")]

# Protocol 3's validation grid (issue 33): the same number of probes for every arm, 3 seeds each, calibration
# only, chosen on the validation split. KernelDNA: its defaults, what trains, the adapters' and norms' rate, the
# kernels' rate; the pruned and SVD students: the rates of their weights and of their norms. Probe text -> fields.
BASELINE_PROBES = {"": {}, "lr=0.01": {"lr": 0.01}, "lr=0.01,weight_lr=0.003": {"lr": 0.01, "weight_lr": 0.003},
                   "lr=0.003,weight_lr=0.003": {"lr": 0.003, "weight_lr": 0.003}}
GRID: dict[str, dict[str, dict[str, Any]]] = {
    "kdna-r4": {"": {}, "train=all": {"train": "all"}, "lr=0.003": {"lr": 0.003},
                "weight_lr=0.003": {"weight_lr": 0.003}},
    "prune@kdna-r4": BASELINE_PROBES, "svd@kdna-r4": BASELINE_PROBES}
GRID_SEEDS = [0, 1, 2]
# What the later plans add to a grid winner: the loss-form control's per-layer losses.
EXTRAS = {"": {}, "layer_loss=gram": {"layer_loss": "gram"}, "features=0": {"features": 0.0}}
# The headline's second rank: each grid arm at rank 8, with the arm's winning probe.
RANK8 = {"kdna-r4": "kdna-r8", "prune@kdna-r4": "prune@kdna-r8", "svd@kdna-r4": "svd@kdna-r8"}


def probe_name(row: str, *texts: str) -> str:
    """``row`` with probe texts on top: ``probe_name("kdna-r4", "lr=0.003", "layer_loss=gram")`` is
    ``kdna-r4:lr=0.003,layer_loss=gram``; no text, the row itself."""
    text = ",".join(t for t in texts if t)
    return f"{row}:{text}" if text else row


def _table() -> dict[str, Row]:
    """BASE under its own names, then every probe a plan can run: each grid arm and its rank-8 twin with each of
    the arm's probes, and each extra on top."""
    rows = {name: dataclasses.replace(row, arm=name) for name, row in BASE.items()}
    for name, probes in GRID.items():
        for text, fields in probes.items():
            for extra, more in EXTRAS.items():
                for row in (name, RANK8[name]):
                    rows.setdefault(probe_name(row, text, extra), dataclasses.replace(rows[row],
                                                                                      probe={**fields, **more}))
    return rows


ROWS = _table()


def arm(name: str) -> str:
    """The row a record's ``name`` is a probe of (itself when it is none, or when the table does not know it)."""
    return ROWS[name].arm if name in ROWS else name


def extra(name: str) -> str:
    """The EXTRAS text a row name carries (``kdna-r4:weight_lr=0.003,layer_loss=gram`` -> ``layer_loss=gram``),
    "" when none."""
    texts = name.partition(":")[2].split(",")
    return next((t for t in texts if t and t in EXTRAS), "")


def method(name: str) -> str:
    return ROWS[name].method if name in ROWS else "other"


def random_plan(plan: kdna_fx.Plan, seed: int) -> kdna_fx.Plan:
    """The eligible convs of each shape group shuffled into families of the sizes ``plan`` has."""
    generator = torch.Generator().manual_seed(seed)
    sizes: dict[Any, list[int]] = {}
    for family in plan.families:
        sizes.setdefault(plan.sites[family.parent].family_key, []).append(len(family.members))
    families = []
    for key, wanted in sizes.items():
        pool = [name for name, site in plan.sites.items() if site.family_key == key]
        pool = [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
        for size in wanted:
            run, pool = pool[:size], pool[size:]
            families.append(kdna_fx.Family(run[0], tuple(run[1:])))
    return kdna_fx.Plan(tuple(families))


@dataclasses.dataclass
class Recipe:
    """How one row makes its student (``make``, timed as the "converted" step) and calibrates it
    (``calibration`` None: not calibrated, the original row)."""

    make: Callable[[], nn.Module]
    calibration: CalibrationConfig | None
    made: dict[str, Any] = dataclasses.field(default_factory=dict)

    def convert(self, original: nn.Module, calib: torch.Tensor, *, finetune: Any = None,
                finetune_config: Any = None, evaluate: dict[str, Iterable[Any]] | None = None
                ) -> ConversionResult:
        """kdna_fx.convert's steps for any student: make it, kdna_fx.calibrate it against ``original``, fine-tune
        it on ``finetune`` (kdna_fx.train.train with ``finetune_config``), scored on ``evaluate`` after each."""
        original.eval()
        stages: dict[str, dict[str, Any]] = {}

        def scored(start: float, model: nn.Module) -> dict[str, Any]:
            return {"seconds": time.perf_counter() - start,  # read first: the scoring is not timed
                    **{split: score(model, original, loader) for split, loader in (evaluate or {}).items()}}

        start = time.perf_counter()
        student = self.make()
        stages["converted"] = scored(start, student)
        report = None
        if self.calibration is not None:
            start = time.perf_counter()
            report = kdna_fx.calibrate(student, calib, self.calibration, reference=original)
            stages["calibrated"] = scored(start, student)
        if finetune is not None:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="kdna_conversion_study_") as tmp:
                train(student, finetune, None, finetune_config, tmp)
            stages["fine-tuned"] = scored(start, student)
        return ConversionResult(student, stages, {"original": n_params(original), "converted": n_params(student)},
                                report)


EXAMPLE = torch.zeros(2, 1, 28, 28)  # one Fashion-MNIST batch: Torch-Pruning's dependency graph


def kdna_config(spec: dict[str, Any], row: Row) -> kdna_fx.KDNAConfig:
    config = sharing_config(spec["name"]).map_adapters(lambda a: dataclasses.replace(a, rank=row.rank))
    return dataclasses.replace(config, **row.config)


def recipe(name: str, original: nn.Module, spec: dict[str, Any], calib: torch.Tensor,
           calibration: CalibrationConfig, all_lr: float) -> Recipe:
    """The recipe of row ``name``; ``calibration`` is the study's (steps, seed), the row sets its own fields on
    top. Pruned and factorised students have no adapters: every weight trains at ``all_lr``."""
    if name not in ROWS:
        raise SystemExit(f"unknown row {name!r}; rows: {', '.join(BASE)} (and the grid's probes)")
    row = ROWS[name]
    own = calibration.replace(**{**row.calibration, **row.probe})
    made: dict[str, Any] = {"probe": dict(row.probe)} if row.probe else {}
    if row.method == "original":
        return Recipe(lambda: copy.deepcopy(original), None)
    if row.method == "kdna":
        config = kdna_config(spec, row)
        plan = random_plan(kdna_fx.plan(original, config), row.shuffle) if row.shuffle is not None else None

        def make() -> nn.Module:
            with torch.no_grad():
                return kdna_fx.transform(original, config, init=row.init, plan=plan, example_inputs=(calib[:8],),
                                         data=calib if config.policy == "cka" else None)

        if "max_children" in row.config:  # the CKA study's rows record which convs pair up
            made["plan"] = kdna_fx.plan_of(make()).to_dict()["families"]
        return Recipe(make, own, made)
    if row.method == "prune+kdna":
        student = kdna_fx.transform(prune(original, row.prune_ratio, EXAMPLE), kdna_config(spec, row),
                                    init=row.init, example_inputs=(calib[:8],))
        return Recipe(lambda: student, own, {**made, "pruning_ratio": row.prune_ratio})
    everything = calibration.replace(train="all", lr=all_lr, weight_lr=all_lr).replace(**row.probe)
    target = n_params(recipe(row.matched_to, original, spec, calib, calibration, all_lr).make())
    made.update(matched_to=row.matched_to, target_params=target)
    if row.method == "prune":
        student, knob = matched(lambda r: prune(original, r, EXAMPLE), target, 0.0, 0.9)
        return Recipe(lambda: student, everything, {**made, "pruning_ratio": knob})
    names = shared_convs(original, sharing_config(spec["name"]))
    student, knob = matched(lambda f: factorise(original, names, f), target, 0.02, 1.0)
    return Recipe(lambda: student, everything, {**made, "rank_fraction": knob, "factorised": names})
