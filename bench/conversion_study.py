"""Conversion study (issues 6 and 24): KernelDNA conversion of a trained CNN against pruning and low-rank
factorisation, every student through the same steps as kdna_fx.convert (bench.conversion_rows.Recipe).

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
2. **calibrate**: ``kdna_fx.calibrate`` with ``CalibrationConfig(steps=--steps)`` on the
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
them in order); a probe ``ROW:key=value,...`` is ROW with those CalibrationConfig fields on top. Every row name is a
key into the table bench/conversion_rows.py builds (``ROWS``); the report is bench/conversion_report.py.
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
from kdna_fx.reporting import count_macs
from kdna_fx.train import TrainConfig, build_data
from kdna_fx.train.checkpoint import CHECKPOINT_NAME, read_checkpoint
from kdna_fx.models import ModelSpec

from bench.common import (REPO, DirtyTreeError, n_params, release_lock, run_provenance, take_lock, time_call,
                          validation_split, write_json)
from bench.conversion_report import report, summarise, winners
from bench.conversion_rows import (ABLATION, GRID, GRID_SEEDS, ORIGINALS, ORIGINALS_DIR, RANK8, ROWS, STUDY_ROWS,
                                   probe_name)
from bench.conversion_rows import recipe as make_recipe

PLANS = ("grid", "headline", "loss-form")
PROTOCOL = 3  # 1: runs_protocol1/ (test-tuned defaults); 2: runs/ (originals trained on the validation images too)


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
    model = ModelSpec.from_dict(spec).build()
    model.load_state_dict(ckpt["model"])
    return model.eval(), spec, {"sha256": digest, "test_top1": info["epochs"][-1]["val_top1"]}


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


# ------------------------------------------------------------------------------------------------ running


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
                                       .make())
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


def plan_jobs(plan: str, args: argparse.Namespace) -> None:
    """Set rows, seeds and out of one protocol-3 plan on ``args``: the grid, then the headline rows and the
    loss-form control with the grid's winners (``<out>/grid``, ``<out>``, ``<out>/loss_form``)."""
    arch = "resnet18_w025"
    args.arch = [arch]
    if plan == "grid":
        args.rows = [probe_name(arm, probe) for arm, probes in GRID.items() for probe in probes]
        args.seeds, args.finetune_images, args.out = GRID_SEEDS, 0, os.path.join(args.out, "grid")
        return
    best = winners(summarise(os.path.join(args.out, "grid")), arch, GRID_SEEDS)

    if plan == "headline":
        args.rows = ["original"] + [probe_name(arm, best[arm]) for arm in GRID] + \
                    [probe_name(RANK8[arm], best[arm]) for arm in GRID]
        args.seeds = [0, 1, 2, 3, 4]
    else:
        args.rows = [probe_name(arm, best[arm], "layer_loss=gram") for arm in GRID]
        args.rows.append(probe_name("prune@kdna-r4", best["prune@kdna-r4"], "features=0"))
        args.seeds, args.out = [0, 1, 2], os.path.join(args.out, "loss_form")


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
    p.add_argument("--rows", nargs="+", default=STUDY_ROWS + ABLATION, choices=list(ROWS), metavar="ROW",
                   help="rows of bench/conversion_rows.py's table (default: the study's and the ablations)")
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
    report(args.out, ["-m", "bench.conversion_study", *args.argv], report_only=args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
