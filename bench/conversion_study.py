"""Conversion study (issues 6 and 24): KernelDNA conversion of a trained CNN against pruning and low-rank
factorisation, every student through the same kdna_fx.convert pipeline.

    .venv/bin/python -m bench.conversion_study                       # the committed study (resumes)
    .venv/bin/python -m bench.conversion_study --arch resnet18_w025 --seeds 0 --rows kdna-r4 prune@kdna-r4
    .venv/bin/python -m bench.conversion_study --report              # tables, verdicts and plot from the records

The originals are trained once with `kdna train` (commands in ``ORIGINALS``, 5 epochs on the 60k Fashion-MNIST
training images). Every row then starts from the same trained weights and gets the same budget:

1. **convert**: the method's own label-free step:
   - ``kdna-r{R}``: ``kdna_fx.transform(original, sharing_config with AdapterConfig(rank=R), init="trained")``;
     ``-centroid`` adds ``KDNAConfig(parent="centroid")``; ``kdna-copy-r0`` uses ``init="copy"`` (the paper's
     from-scratch init) as a control. Ablations (first seed only): ``-adapters`` distils adapters and norms
     only (``train="adapters"``), ``-logits`` drops the per-layer loss (``features=0``), ``-gram`` compares
     every layer by the Gram loss the pruned students get (``layer_loss="gram"``).
   - ``prune@ROW``: Torch-Pruning (``MetaPruner``, L2 magnitude importance, the same ratio in every layer, the
     classifier kept) at the ratio whose parameter count is closest to ROW's (bench.common.matched).
   - ``svd@ROW``: every conv that KernelDNA shares in that architecture becomes a k x k conv to R_i channels and
     a 1x1 conv back (truncated SVD of the kernel viewed as [C_out, C_in k k]), R_i = the same fraction of each
     conv's full rank, the fraction chosen to match ROW's parameter count.
   - ``prune{P}+kdna-r{R}``: prune at ratio P/100 first, then convert as ``kdna-r{R}`` (fewer MACs too).
   - ``original``: unchanged (the fine-tune control).
2. **calibrate**: ``kdna_fx.convert`` runs ``kdna_fx.calibrate`` with ``CalibrationConfig(steps=--steps)`` on the
   same ``--calib-images`` unlabeled training images for every row: BatchNorm re-estimation, then distillation
   with KL to the original's logits plus the per-layer loss on every norm layer found at the same path in both
   models (``features=1``, ``layer_loss="auto"``). The per-layer loss reaches **every** student: where a layer
   keeps its shape (KernelDNA, SVD) it is the normalised MSE; where pruning narrowed it, it is 2 * (1 - linear
   CKA) between the two outputs over the batch (kdna_fx.calibration.gram_loss), which needs no channel
   correspondence (pruning keeps an unknown subset of channels, so per-channel statistics cannot be paired, and
   a learnt projection would add parameters only the pruned students train). KernelDNA rows distil adapters and
   norms at lr 1e-2 and the shared kernels at 1e-3 (``train="parents"``); pruned and factorised students have
   no adapters and train every parameter at ``--all-lr`` (``train="all"``).
3. **fine-tune**: one epoch on ``--finetune-images`` labelled training images (SGD, lr 0.01, cosine, batch 128),
   the same for every row, the original included.

The data protocol: ``--val-images`` training images (a fixed seeded split, bench.common.validation_split) are
held out; calibration and fine-tune images are drawn from the rest, per seed. Each stage is scored on that
validation split (the only split any tuning may look at: bench/calibration_probe.py) and on the 10,000 test
images (reported, never tuned on). Per row also: parameters, MACs (one 1x28x28 image), and eager CPU latency at
batch 1 and throughput at batch 32 of the deployable form (KernelDNA rows folded with ``kdna_fx.fold``).

Each (arch, row, seed) is one JSON file under ``<out>/runs/``; present files are skipped, so the study resumes,
and a lock per job lets several processes share the queue. Records are written only from committed code
(``--force-dirty`` overrides, and marks them). ``--report`` (also run at the end) writes
``<out>/conversion_study.{json,md,png}`` with the verdicts of bench.common.paired (the seeds of two rows pair up).

Protocol 3 (issue 33): ``--plan grid|headline|loss-form`` sets rows, seeds and folder (bench/protocol3.sh runs
them in order); a row ``ROW:key=value,...`` is ROW with those CalibrationConfig fields on top (a grid probe).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import kdna_fx
from kdna_fx.calibration import CalibrationConfig
from kdna_fx.models import sharing_config
from kdna_fx.reporting import count_macs
from kdna_fx.train import TrainConfig, build_data
from kdna_fx.train.checkpoint import CHECKPOINT_NAME, read_checkpoint
from kdna_fx.train.models import build_model

from bench.common import (REPO, DirtyTreeError, factorise, machine_label, markdown_table, matched, n_params, paired,
                          paired_cell, prune, release_lock, run_provenance, shared_convs, take_lock, time_call,
                          validation_split, write_json, write_results)


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
ROWS = ["original", "kdna-r4", "prune@kdna-r4", "svd@kdna-r4", "kdna-r0", "prune@kdna-r0", "svd@kdna-r0",
        "kdna-r8", "prune@kdna-r8", "svd@kdna-r8", "kdna-r4-centroid", "kdna-copy-r0", "prune30+kdna-r4",
        "prune@prune30+kdna-r4"]
# Which calibration steps matter: the same conversion with parts of the recipe switched off (first seed only).
ABLATION = ["kdna-r4-adapters-logits", "kdna-r4-logits", "kdna-r4-adapters", "kdna-r4-gram"]
# The verdicts: each KernelDNA row against the baselines matched to its parameter count.
HEADLINE = [("kdna-r4", "prune@kdna-r4"), ("kdna-r4", "svd@kdna-r4"), ("kdna-r0", "prune@kdna-r0"),
            ("kdna-r0", "svd@kdna-r0"), ("kdna-r8", "prune@kdna-r8"), ("kdna-r8", "svd@kdna-r8"),
            ("prune30+kdna-r4", "prune@prune30+kdna-r4")]
# Protocol 3's validation grid (issue 33): the same number of probes for every arm, 3 seeds each, calibration
# only, chosen on the validation split. KernelDNA: its defaults, what trains, the adapters' and norms' rate, the
# kernels' rate; the pruned and SVD students: the rates of their weights and of their norms (protocol 2 gave both
# 1e-3, where KernelDNA's norms learn at 1e-2). Steps and losses are the budget, the same for every arm.
BASELINE_PROBES = ["", ":lr=0.01", ":lr=0.01,weight_lr=0.003", ":lr=0.003,weight_lr=0.003"]
GRID = {"kdna-r4": ["", ":train=all", ":lr=0.003", ":weight_lr=0.003"],
        "prune@kdna-r4": BASELINE_PROBES, "svd@kdna-r4": BASELINE_PROBES}
GRID_SEEDS = [0, 1, 2]
PLANS = ("grid", "headline", "loss-form")
PROTOCOL = 3  # 1: runs_protocol1/ (test-tuned defaults); 2: runs/ (originals trained on the validation images too)
STAGES = ("converted", "calibrated", "fine-tuned")


# ------------------------------------------------------------------------------------------------ building


def run_dir(arch: str) -> str:
    return re.search(r"--run-dir (\S+)", ORIGINALS[arch]).group(1)  # type: ignore[union-attr]


def freeze_original(arch: str, val_images: int) -> None:
    """Copy the trained original's weights out of its run dir into ORIGINALS_DIR (committed, so later sessions
    distil from the very same weights), with their sha256 and the training record."""
    run = run_dir(arch)
    ckpt = read_checkpoint(os.path.join(run, CHECKPOINT_NAME))
    data = ckpt["config"]["data"]
    if data.get("train_subset") != 60_000 - val_images or ckpt["config"]["seed"] != 0:
        raise SystemExit(f"{run} was not trained without the validation split: train it with\n  .venv/bin/{ORIGINALS[arch]}")
    path = os.path.join(ORIGINALS_DIR, f"{arch}.pt")
    os.makedirs(ORIGINALS_DIR, exist_ok=True)
    torch.save({"model": ckpt["model"], "config": ckpt["config"]}, path)
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    write_json(os.path.join(ORIGINALS_DIR, f"{arch}.json"),
               {"arch": arch, "sha256": sha256(path), "command": ORIGINALS[arch], **metrics})


def sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_original(arch: str) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(the frozen original, its model spec, {"sha256", "val_top1"}): refuses weights whose hash differs from the
    one recorded beside them."""
    path = os.path.join(ORIGINALS_DIR, f"{arch}.pt")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: train the original with\n  .venv/bin/{ORIGINALS[arch]}\nthen "
                         f"freeze it with  .venv/bin/python -m bench.conversion_study --freeze-original {arch}")
    with open(os.path.join(ORIGINALS_DIR, f"{arch}.json")) as f:
        info = json.load(f)
    digest = sha256(path)
    if digest != info["sha256"]:
        raise SystemExit(f"{path}: sha256 {digest} differs from the recorded {info['sha256']}; restore it with git")
    ckpt = torch.load(path, map_location="cpu")
    spec = ckpt["config"]["model"]
    model = build_model(spec)
    model.load_state_dict(ckpt["model"])
    return model.eval(), spec, {"sha256": digest, "test_top1": info["epochs"][-1]["val_top1"]}


def split_row(row: str) -> tuple[str, dict[str, Any]]:
    """``ROW:key=value,...`` -> (ROW, calibration options the probe sets on top of the row's own): the
    validation grid's probes, e.g. ``prune@kdna-r4:lr=0.01,weight_lr=0.003`` or ``kdna-r4:train=all``."""
    base, _, probe = row.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, probe.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    return base, options


def kdna_config(spec: dict[str, Any], row: str) -> tuple[kdna_fx.KDNAConfig, str, dict[str, Any], int | None]:
    """(config, init, calibrate options, random-plan seed) of a ``kdna-...`` row; no flag: calibrate's defaults.

    Plan flags (the CKA study's rows): ``-pairs`` caps families at one child (``max_children=1``), ``-cka``
    groups by measured similarity (``policy="cka"``), ``-random{K}`` shuffles the members of each shape group
    into families of the same sizes with seed K.
    """
    m = re.fullmatch(r"kdna(-copy)?-r(\d+)((?:-centroid|-adapters|-all|-logits|-gram|-pairs|-cka|-random\d+)*)", row)
    if m is None:
        raise SystemExit(f"unknown KernelDNA row {row!r}")
    rank, flags = int(m.group(2)), m.group(3)
    config = sharing_config(spec["name"]).map_adapters(lambda a: dataclasses.replace(a, rank=rank))
    if "-centroid" in flags:
        config = dataclasses.replace(config, parent="centroid")
    if "-pairs" in flags:
        config = dataclasses.replace(config, max_children=1)
    if "-cka" in flags:
        config = dataclasses.replace(config, policy="cka")
    options: dict[str, Any] = {}
    if "-adapters" in flags or "-all" in flags:
        options["train"] = "adapters" if "-adapters" in flags else "all"
    if "-logits" in flags:
        options["features"] = 0.0
    if "-gram" in flags:
        options["layer_loss"] = "gram"
    shuffle = re.search(r"-random(\d+)", flags)
    return config, ("copy" if m.group(1) else "trained"), options, int(shuffle.group(1)) if shuffle else None


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
    """How one row makes its student: kdna_fx.convert transforms the original with ``config``/``init``/``plan``,
    or takes ``student`` as made; ``calibration`` None means no calibration (the original row)."""

    calibration: CalibrationConfig | None
    config: kdna_fx.KDNAConfig | None = None
    init: str = "trained"
    plan: Any = None
    student: nn.Module | None = None
    made: dict[str, Any] = dataclasses.field(default_factory=dict)

    def convert(self, original: nn.Module, calib: torch.Tensor, **kwargs: Any) -> kdna_fx.ConversionResult:
        if self.student is not None:
            return kdna_fx.convert(original, calib, calibration=self.calibration, student=self.student,
                                   run_calibration=self.calibration is not None, **kwargs)
        return kdna_fx.convert(original, calib, self.config, calibration=self.calibration, init=self.init,
                               plan=self.plan, run_calibration=self.calibration is not None, **kwargs)

    def build(self, original: nn.Module, calib: torch.Tensor) -> nn.Module:
        """The student before calibration (parameter targets, timing)."""
        return dataclasses.replace(self, calibration=None).convert(original, calib).model


EXAMPLE = torch.zeros(2, 1, 28, 28)  # one Fashion-MNIST batch: Torch-Pruning's dependency graph


def make_recipe(row: str, original: nn.Module, spec: dict[str, Any], calib: torch.Tensor,
                calibration: CalibrationConfig, all_lr: float) -> Recipe:
    """The recipe of one row; ``calibration`` is the study's (steps, seed), the row adds its own options and a
    probe (``ROW:key=value``) its own on top."""
    base, probe = split_row(row)
    if probe:
        recipe = make_recipe(base, original, spec, calib, calibration, all_lr)
        if recipe.calibration is None:
            raise SystemExit(f"{row!r}: the original row is not calibrated, so it takes no probe")
        recipe.calibration = recipe.calibration.replace(**probe)
        recipe.made["probe"] = probe
        return recipe
    if row == "original":
        return Recipe(None, student=original)
    if row.startswith("kdna"):
        config, init, options, shuffle = kdna_config(spec, row)
        plan = random_plan(kdna_fx.plan(original, config), shuffle) if shuffle is not None else None
        recipe = Recipe(calibration.replace(**options), config, init, plan)
        if re.search(r"-(pairs|cka|random)", row):
            recipe.made = {"plan": kdna_fx.plan_of(recipe.build(original, calib)).to_dict()["families"]}
        return recipe
    everything = calibration.replace(train="all", lr=all_lr, weight_lr=all_lr)  # no adapters: every weight
    m = re.fullmatch(r"(prune|svd)@(.+)", row)
    if m:
        target = n_params(make_recipe(m.group(2), original, spec, calib, calibration, all_lr).build(original, calib))
        if m.group(1) == "prune":
            student, knob = matched(lambda r: prune(original, r, EXAMPLE), target, 0.0, 0.9)
            return Recipe(everything, student=student,
                          made={"pruning_ratio": knob, "matched_to": m.group(2), "target_params": target})
        names = shared_convs(original, sharing_config(spec["name"]))
        student, knob = matched(lambda f: factorise(original, names, f), target, 0.02, 1.0)
        return Recipe(everything, student=student, made={"rank_fraction": knob, "matched_to": m.group(2),
                                                         "target_params": target, "factorised": names})
    m = re.fullmatch(r"prune(\d+)\+(kdna-.+)", row)
    if m:
        ratio = int(m.group(1)) / 100
        config, init, options, _ = kdna_config(spec, m.group(2))
        student = kdna_fx.transform(prune(original, ratio, EXAMPLE), config, init=init, example_inputs=(calib[:8],))
        return Recipe(calibration.replace(**options), student=student, made={"pruning_ratio": ratio})
    raise SystemExit(f"unknown row {row!r}; rows look like {ROWS + ABLATION}")


# ------------------------------------------------------------------------------------------------ measuring


def deployable(model: nn.Module) -> nn.Module:
    """What one would ship: KernelDNA rows folded (kdna_fx.fold), others as they are; eval mode."""
    transformed = isinstance(getattr(model, "meta", None), dict) and "kdna" in model.meta
    return (kdna_fx.fold(model) if transformed else model).eval()


def cost(model: nn.Module) -> dict[str, Any]:
    """Parameters, MACs and a first latency reading, taken inside the run (other jobs may share the cores:
    ``--speed`` re-times every row interleaved in one process)."""
    deployable_model = deployable(model)
    one, batch = torch.randn(1, 1, 28, 28), torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        latency = time_call(lambda: deployable_model(one), warmup=5, repeat=30)
        throughput = time_call(lambda: deployable_model(batch), warmup=2, repeat=10)
    return {"params": n_params(model), "macs": count_macs(model, one)[0],
            "latency_b1_ms": 1e3 * latency["median_s"], "images_per_s_b32": 32 / throughput["median_s"]}


@dataclasses.dataclass
class Split:
    """The study's data: held-out validation images (from the training images), the pool the calibration and
    fine-tune images are drawn from, and the test set."""

    data: Any
    pool: list[int]
    validation: list[int]

    @classmethod
    def make(cls, data: Any, val_images: int) -> "Split":
        pool, validation = validation_split(len(data.train), val_images, seed=0)
        return cls(data, pool, validation)

    def plain(self) -> Any:
        """The training set without augmentation: calibration and validation see the images as they are."""
        plain = copy.copy(self.data.train)
        plain.augment = False
        return plain

    def calibration_images(self, n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
        """(the first ``n`` pool images of the seeded order, un-augmented; the rest of that order): the fine-tune
        takes its labelled images from the rest, so the two never overlap, and neither touches validation."""
        g = torch.Generator().manual_seed(seed)
        order = [self.pool[i] for i in torch.randperm(len(self.pool), generator=g).tolist()]
        plain = self.plain()
        return torch.stack([plain[i][0] for i in order[:n]]), order[n:]

    def loaders(self, test_images: int = 0) -> dict[str, DataLoader]:
        test = self.data.val if not test_images else Subset(self.data.val, range(test_images))
        return {"validation": DataLoader(Subset(self.plain(), self.validation), batch_size=500),
                "test": DataLoader(test, batch_size=500)}


def run_one(arch: str, row: str, seed: int, args: argparse.Namespace, path: str) -> None:
    torch.manual_seed(seed)
    original, spec, frozen = load_original(arch)
    split = Split.make(build_data("fashion-mnist", args.data), args.val_images)
    calib, rest = split.calibration_images(args.calib_images, seed)
    labelled = Subset(split.data.train, rest[:args.finetune_images]) if args.finetune_images else None
    calibration = CalibrationConfig(steps=args.steps, seed=seed, progress=args.progress)
    recipe = make_recipe(row, original, spec, calib, calibration, args.all_lr)
    finetune = TrainConfig(epochs=1, batch_size=128, lr=0.01, warmup_epochs=0, seed=seed, amp="none",
                           progress=args.progress, log_every=10_000)  # the same for every row
    result = recipe.convert(original, calib, finetune=labelled, finetune_config=finetune,
                            evaluate=split.loaders(args.test_images))
    record: dict[str, Any] = {"arch": arch, "row": row, "seed": seed, "protocol": PROTOCOL, "made": recipe.made,
                              "calibrate_config": recipe.calibration.to_dict() if recipe.calibration else None,
                              "params_original": n_params(original), "stages": result.stages,
                              "calibration": result.calibration.to_dict() if result.calibration else None,
                              "cost": cost(result.model), "data": {"val_images": args.val_images,
                                                                   "calib_images": args.calib_images,
                                                                   "finetune_images": args.finetune_images},
                              "original": frozen, "provenance": args.provenance}
    write_json(path, record)


# ------------------------------------------------------------------------------------------------ report


def speed(args: argparse.Namespace) -> None:
    """Re-time the deployable form of every row on disk, rows interleaved in one process (weights do not
    change the time: each row is rebuilt uncalibrated), median over ``--speed-rounds`` rounds."""
    prov = run_provenance(["-m", "bench.conversion_study", *args.argv], out=args.out, force_dirty=args.force_dirty)
    summary = summarise(args.out)
    for arch in sorted({r["arch"] for r in summary["rows"]}):
        original, spec, _ = load_original(arch)
        calib = torch.randn(64, 1, 28, 28)  # only for policy="cka" rows: which convs pair up, not the time
        calibration = CalibrationConfig(progress=False)
        models = {r["row"]: deployable(make_recipe(r["row"], original, spec, calib, calibration, args.all_lr)
                                       .build(original, calib))
                  for r in summary["rows"] if r["arch"] == arch}
        one, batch = torch.randn(1, 1, 28, 28), torch.randn(32, 1, 28, 28)
        samples: dict[str, dict[str, list[float]]] = {row: {"b1": [], "b32": []} for row in models}
        for _ in range(args.speed_rounds):
            for row, model in models.items():
                with torch.no_grad():
                    samples[row]["b1"].append(time_call(lambda: model(one), warmup=3, repeat=50)["median_s"])
                    samples[row]["b32"].append(time_call(lambda: model(batch), warmup=1, repeat=10)["median_s"])
        result = {row: {"latency_b1_ms": 1e3 * statistics.median(v["b1"]),
                        "latency_b1_ms_min_max": [1e3 * min(v["b1"]), 1e3 * max(v["b1"])],
                        "images_per_s_b32": 32 / statistics.median(v["b32"])} for row, v in samples.items()}
        write_json(os.path.join(args.out, f"speed_{arch}.json"),
                  {"rows": result, "rounds": args.speed_rounds, "threads": torch.get_num_threads(),
                   "provenance": prov})
        print(f"{arch}: timed {len(models)} rows")


def summarise(out: str) -> dict[str, Any]:
    """Per (arch, row): costs, and per stage the test and validation top-1 over the seeds (mean, spread, the
    values themselves: the verdicts compare them)."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for root, _, files in os.walk(os.path.join(out, "runs")):
        for name in sorted(files):
            if name.endswith(".json"):
                with open(os.path.join(root, name)) as f:
                    r = _upgrade(json.load(f))
                runs.setdefault((r["arch"], r["row"]), []).append(r)
    order = ROWS + ABLATION
    rows = []
    for (arch, row), rs in sorted(runs.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1])
                                                                if kv[0][1] in order else 99)):
        rs = sorted(rs, key=lambda r: r["seed"])
        entry: dict[str, Any] = {"arch": arch, "row": row, "seeds": [r["seed"] for r in rs],
                                 "params": rs[0]["cost"]["params"], "params_original": rs[0]["params_original"],
                                 "macs": rs[0]["cost"]["macs"],
                                 "latency_b1_ms": statistics.median(r["cost"]["latency_b1_ms"] for r in rs),
                                 "images_per_s_b32": statistics.median(r["cost"]["images_per_s_b32"] for r in rs),
                                 "calibration_s": statistics.mean((r.get("calibration") or {}).get("seconds", 0.0)
                                                                  for r in rs),
                                 "dirty": any(r["provenance"].get("git", {}).get("dirty") for r in rs),
                                 "protocol": rs[0].get("protocol", 1), "original": rs[0].get("original"),
                                 "machines": sorted({machine_label(r["provenance"]["machine"]) for r in rs})}
        for stage in STAGES:
            if not all(stage in r["stages"] for r in rs):
                continue
            entry[stage] = {}
            for split in ("test", "validation"):
                if not all(split in r["stages"][stage] for r in rs):
                    continue
                top1 = [r["stages"][stage][split]["top1"] for r in rs]
                entry[stage][split] = {"top1": top1, "top1_mean": statistics.mean(top1),
                                       "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                                       "top1_min": min(top1), "top1_max": max(top1),
                                       "agreement_mean": statistics.mean(r["stages"][stage][split]["agreement"]
                                                                         for r in rs)}
        rows.append(entry)
    for arch in {r["arch"] for r in rows}:
        path = os.path.join(out, f"speed_{arch}.json")
        if os.path.exists(path):  # the interleaved timings replace the in-run readings
            with open(path) as f:
                timed = json.load(f)["rows"]
            for r in rows:
                if r["arch"] == arch and r["row"] in timed:
                    r.update(timed[r["row"]], timing="interleaved")
    return {"rows": rows, "verdicts": verdicts(rows)}


def _upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """A protocol-1 record (stages scored on the test images only, flat) in the present layout."""
    if record.get("protocol", 1) == 1:
        record["stages"] = {stage: {"seconds": v["seconds"], "test": {"top1": v["top1"], "agreement": v["agreement"]}}
                            for stage, v in record["stages"].items()}
    return record


def by_seed(entry: dict[str, Any], stage: str, split: str = "test") -> dict[int, float]:
    """{seed: top-1} of one row at one stage (empty when the stage is missing)."""
    if stage not in entry or split not in entry[stage]:
        return {}
    return dict(zip(entry["seeds"], entry[stage][split]["top1"]))


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each HEADLINE pair present (any probes of the two rows, ``ROW:...``), judged by bench.common.paired on
    the test top-1 of the seeds both ran (a seed's rows share images and order), after calibration and after
    the fine-tune."""
    out = []
    for mine, other in HEADLINE:
        for a in (r for r in rows if split_row(r["row"])[0] == mine):
            for b in (r for r in rows if split_row(r["row"])[0] == other and r["arch"] == a["arch"]):
                entry: dict[str, Any] = {"arch": a["arch"], "row": a["row"], "baseline": b["row"]}
                for stage in ("calibrated", "fine-tuned"):
                    if by_seed(a, stage) and by_seed(b, stage):
                        entry[stage] = paired(by_seed(a, stage), by_seed(b, stage))
                out.append(entry)
    return sorted(out, key=lambda v: v["arch"])


def winners(summary: dict[str, Any], arch: str, seeds: list[int]) -> dict[str, str]:
    """{arm: the probe suffix with the best mean validation top-1 after calibration over ``seeds``}; refuses a
    grid with runs missing."""
    found = {r["row"]: r for r in summary["rows"] if r["arch"] == arch}
    best = {}
    for arm, probes in GRID.items():
        scores = {}
        for probe in probes:
            r = found.get(arm + probe)
            if r is None or sorted(by_seed(r, "calibrated", "validation")) != sorted(seeds):
                raise SystemExit(f"the validation grid lacks {arm + probe} on seeds {seeds}: run --plan grid first")
            scores[probe] = statistics.mean(by_seed(r, "calibrated", "validation").values())
        best[arm] = max(scores, key=scores.get)  # type: ignore[arg-type]
    return best


def grid_text(summary: dict[str, Any]) -> str:
    """Each arm's probes by mean validation top-1 after calibration, the winner first."""
    lines = []
    for arm, probes in GRID.items():
        rows = [r for r in summary["rows"] if split_row(r["row"])[0] == arm and r["row"][len(arm):] in probes]
        rows.sort(key=lambda r: -r["calibrated"]["validation"]["top1_mean"] if "calibrated" in r else 0)
        lines += [[f"`{arm}`", f"`{r['row'][len(arm) + 1:] or 'as in protocol 2'}`", len(r["seeds"]),
                   cell(r, "calibrated", "validation"), cell(r, "calibrated")] for r in rows]
    return ("Validation grid: the same number of probes per arm, chosen on the validation split (the test column is "
            "reported, never used)\n\n" + markdown_table(["arm", "probe", "seeds", "calibrated, validation top-1 % / "
                                                          "agreement", "calibrated, test"], lines))


def plan_jobs(plan: str, args: argparse.Namespace) -> None:
    """Set rows, seeds and out of one protocol-3 plan on ``args``: the grid, then the headline rows and the
    loss-form control with the grid's winners (``<out>/grid``, ``<out>``, ``<out>/loss_form``)."""
    arch = "resnet18_w025"
    args.arch = [arch]
    if plan == "grid":
        args.rows = [arm + probe for arm, probes in GRID.items() for probe in probes]
        args.seeds, args.finetune_images, args.out = GRID_SEEDS, 0, os.path.join(args.out, "grid")
        return
    best = winners(summarise(os.path.join(args.out, "grid")), arch, GRID_SEEDS)

    def probe(row: str, extra: str = "") -> str:
        suffix = best[row] + extra
        return row + (":" + suffix.lstrip(":,") if suffix else "")

    if plan == "headline":
        args.rows = ["original"] + [probe(row) for row in ("kdna-r4", "prune@kdna-r4", "svd@kdna-r4")] + \
                    [probe(row).replace("kdna-r4", "kdna-r8") for row in ("kdna-r4", "prune@kdna-r4", "svd@kdna-r4")]
        args.seeds = [0, 1, 2, 3, 4]
    else:
        args.rows = [probe(row, ",layer_loss=gram") for row in ("kdna-r4", "prune@kdna-r4", "svd@kdna-r4")]
        args.rows.append(probe("prune@kdna-r4", ",features=0"))
        args.seeds, args.out = [0, 1, 2], os.path.join(args.out, "loss_form")


def range_text(entry: dict[str, Any], stage: str) -> str:
    s = entry.get(stage, {}).get("test")
    return f"{s['top1_min']:.2f}-{s['top1_max']:.2f}" if s else "-"


def verdicts_text(summary: dict[str, Any]) -> str:
    found = {(r["arch"], r["row"]): r for r in summary["rows"]}
    lines = [[v["arch"], f"`{v['row']}`", f"`{v['baseline']}`",
              f"{range_text(found[v['arch'], v['row']], stage)} vs {range_text(found[v['arch'], v['baseline']], stage)}",
              paired_cell(v.get(stage)), stage]
             for v in summary["verdicts"] for stage in ("calibrated", "fine-tuned")]
    if not summary["verdicts"]:
        return ""
    head = ("Verdicts (bench.common.paired, the one rule where arms share seeds): the test top-1 differences row - "
            "baseline, seed by seed (both ran the same images in the same order), their mean and 95 % t interval; "
            "above (below) only when the interval excludes 0, else not distinguishable at n seeds; fewer than 3 "
            "pairs are reported, never judged. The seed ranges (min-max) are shown beside.")
    return head + "\n\n" + markdown_table(["arch", "row", "baseline (same parameters)", "test top-1 ranges",
                                            "paired difference [95 % interval], n", "stage"], lines)


def cell(entry: dict[str, Any], stage: str, split: str = "test") -> str:
    """One table cell: mean top-1 (± standard deviation over seeds) / mean agreement, or "-"."""
    if stage not in entry or split not in entry[stage]:
        return "-"
    s = entry[stage][split]
    spread = f" ± {s['top1_std']:.2f}" if s["top1_std"] else ""
    return f"{s['top1_mean']:.2f}{spread} / {s['agreement_mean']:.3f}"


def table(summary: dict[str, Any], arch: str) -> str:
    rows = [[f"`{r['row']}`" + (" (dirty tree)" if r["dirty"] else ""), f"{r['params']:,}",
             f"{r['macs'] / 1e6:.1f}", len(r["seeds"]), cell(r, "converted"), cell(r, "calibrated"),
             cell(r, "fine-tuned"), cell(r, "calibrated", "validation"), f"{r['calibration_s']:.0f}",
             f"{r['latency_b1_ms']:.2f}", f"{r['images_per_s_b32']:.0f}"]
            for r in summary["rows"] if r["arch"] == arch]
    return markdown_table(["row", "params", "MMACs", "seeds", "converted: test top-1 % / agreement",
                           "calibrated", "fine-tuned", "calibrated, validation split", "calibration s", "b1 ms",
                           "b32 img/s"], rows)


def plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["arch"] for r in summary["rows"]})
    fig, axes = plt.subplots(len(archs), 3, figsize=(18, 4.5 * len(archs)), squeeze=False)
    style = {"kdna": ("tab:blue", "o"), "prune": ("tab:orange", "s"), "svd": ("tab:green", "^"),
             "original": ("black", "*")}
    panels = (("calibrated", "params", "after label-free calibration"),
              ("fine-tuned", "params", "after 1-epoch fine-tune"),
              ("fine-tuned", "latency_b1_ms", "after fine-tune, against batch-1 latency"))
    for ax_row, arch in zip(axes, archs):
        for ax, (stage, x_key, what) in zip(ax_row, panels):
            for r in (r for r in summary["rows"] if r["arch"] == arch):
                kind = "original" if r["row"] == "original" else re.split(r"[@\-0-9+]", r["row"])[0]
                if "+" in r["row"]:
                    kind = "prune+kdna"
                color, marker = style.get(kind, ("tab:purple", "D"))
                if stage not in r:
                    continue
                s = r[stage]["test"]
                ax.errorbar(r[x_key], s["top1_mean"], yerr=[[s["top1_mean"] - s["top1_min"]],
                                                             [s["top1_max"] - s["top1_mean"]]],
                            color=color, marker=marker, capsize=3, linestyle="none")
                ax.annotate(r["row"], (r[x_key], s["top1_mean"]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
            ax.set_xlabel("parameters" if x_key == "params" else "batch-1 latency, ms (eager CPU, 1 thread; "
                          "KernelDNA folded)")
            ax.set_ylabel("top-1 % (10k test; bars: min-max over seeds)")
            ax.set_title(f"{arch}: {what}")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: str, argv: list[str] | None = None) -> None:
    summary = summarise(out)
    if not summary["rows"]:
        print(f"no runs under {out}/runs yet")
        return
    archs = sorted({r["arch"] for r in summary["rows"]})
    md = "\n\n".join(f"### {a}\n\nOriginal: {original_text(summary, a)}\n\n{table(summary, a)}" for a in archs)
    machines = sorted({m for r in summary["rows"] for m in r["machines"]})
    grid = any(split_row(r["row"])[0] in GRID and ":" in r["row"] for r in summary["rows"])
    md += "\n\n" + (grid_text(summary) if grid else verdicts_text(summary))  # a grid chooses, it judges nothing
    protocols = ", ".join(str(p) for p in sorted({r["protocol"] for r in summary["rows"]}))
    md += (f"\n\nRuns on: {', '.join(machines)}. Protocol {protocols} (the study's "
           f"README says what each one changed). Latency and throughput: the interleaved `--speed` timing where one "
           f"exists (speed_<arch>.json), else the in-run reading.")
    print(md)
    try:  # the report names the commit that wrote it, so only committed code writes it
        prov = run_provenance(argv, out=out)
    except DirtyTreeError as exc:
        print(f"\n(not written: {exc})")
        return
    write_results(os.path.join(out, "conversion_study"), {**summary, "provenance": prov}, md)
    plot(summary, os.path.join(out, "conversion_study.png"))


def original_text(summary: dict[str, Any], arch: str) -> str:
    """The original the rows distil from: its sha256 and test top-1 (protocol 3), else the study's README."""
    frozen = {(r["original"] or {}).get("sha256") for r in summary["rows"] if r["arch"] == arch}
    if None in frozen or len(frozen) != 1:
        return "trained as the study's README says for this protocol (no hash in the records)"
    info = next(r["original"] for r in summary["rows"] if r["arch"] == arch)
    return (f"`{ORIGINALS[arch]}` ({info['test_top1']:.2f} % on the test images), frozen in "
            f"originals/{arch}.pt, sha256 `{info['sha256'][:16]}...` in every record")


def run_jobs(todo: list[tuple[str, str, int]], args: argparse.Namespace) -> bool:
    """Run every job not on disk and not held by another live process; True while some are still missing."""
    missing = False
    for i, (arch, row, seed) in enumerate(todo):
        path = os.path.join(args.out, "runs", arch, row, f"seed{seed}.json")
        lock = os.path.join(REPO, "runs", "conversion_locks", os.path.normpath(args.out).replace(os.sep, "_"),
                            arch, row, f"seed{seed}")  # gitignored
        if os.path.exists(path):
            continue
        if not take_lock(lock):
            missing = True  # another process runs it
            continue
        try:
            print(f"[{i + 1}/{len(todo)}] {arch} {row} seed {seed}", flush=True)
            started = time.perf_counter()
            run_one(arch, row, seed, args, path)
            print(f"    done in {time.perf_counter() - started:.0f} s", flush=True)
        finally:
            release_lock(lock)
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=list(ORIGINALS), choices=list(ORIGINALS))
    p.add_argument("--rows", nargs="+", default=ROWS + ABLATION)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--all-lr", type=float, default=1e-3, help="distillation lr when every parameter trains")
    p.add_argument("--finetune-images", type=int, default=10_000, help="0: no fine-tune (the validation grid)")
    p.add_argument("--val-images", type=int, default=5_000,
                   help="training images held out as the validation split (never calibrated or fine-tuned on)")
    p.add_argument("--test-images", type=int, default=0, help="score on the first N test images (0: all 10,000)")
    p.add_argument("--data", default=None, help="Fashion-MNIST directory (default: the Debian package's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/conversion")
    p.add_argument("--report", action="store_true", help="only write the tables and the plot")
    p.add_argument("--speed", action="store_true", help="re-time every row on disk, interleaved, then report")
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--force-dirty", action="store_true",
                   help="run from a tree with uncommitted changes (the records are marked dirty)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--plan", choices=PLANS, help="a protocol-3 plan: its rows, seeds and folder under --out "
                   "(headline and loss-form take the grid's winners); waits for jobs other processes hold")
    p.add_argument("--freeze-original", metavar="ARCH", choices=list(ORIGINALS),
                   help="copy ARCH's trained original into bench/results/conversion/originals/ with its sha256")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    torch.set_num_threads(args.threads)
    if args.freeze_original:
        freeze_original(args.freeze_original, args.val_images)
        return 0
    if args.speed:
        speed(args)
    elif not args.report:
        if args.plan:
            plan_jobs(args.plan, args)
        try:
            args.provenance = run_provenance(["-m", "bench.conversion_study", *args.argv],
                                             force_dirty=args.force_dirty)
        except DirtyTreeError as exc:
            raise SystemExit(str(exc)) from None
        todo = [(a, r, s) for s in args.seeds for a in args.arch for r in args.rows  # seed-major: spread noise
                if r not in ABLATION or s == args.seeds[0]]
        while run_jobs(todo, args) and args.plan:
            time.sleep(60)  # the next plan needs this one whole: wait for (or take over) other processes' jobs
    report(args.out, ["-m", "bench.conversion_study", *args.argv])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
