"""Frontier study (issue 11): Fashion-MNIST accuracy against cost, KernelDNA vs plain ResNet-18s vs the peers.

    OMP_NUM_THREADS=1 nohup .venv/bin/python -m bench.frontier_study > logs/frontier.log 2>&1 &   # the queue
    .venv/bin/python -m bench.frontier_study --estimate        # time a few training steps of every row
    .venv/bin/python -m bench.frontier_study --speed           # re-time every row compiled, interleaved (per CPU)
    .venv/bin/python -m bench.frontier_study --report          # tables and plots from the runs on disk
    .venv/bin/python -m bench.frontier_study --preset short    # the former accuracy_study: 10k images, 3 epochs

Every row is a ResNet-18 with the same small stem (a 3x3 stride-1 stem, no max-pool), built by the zoo's one
resolver: a row is a name (the key of its records and timings) defined in ``ROW_TABLE`` as a zoo name with its tag
and the ``create_model`` options beyond ``STUDY_OPTIONS`` (``num_classes=10, in_chans=1, small_stem=True``):

- ``plain-w{W}``: ``resnet18.plain``, torchvision's ResNet-18 at width W (the plain-net curve);
- ``replace-w{W}``: ``resnet18.replace`` (kdna_fx.transform of the plain net, sharing within the original depth);
- ``kdna-w{W}``: ``resnet18.kdna``, the paper's reference topology (stages 3-4 grow to 3 blocks);
- ``relaxed-r{R}-w{W}``: ``resnet18.relaxed`` with ``rank=R``: replace mode whose children carry a rank-R kernel
  residual (the same transform, the architecture's sharing config mapped to ``AdapterConfig(rank=R)``);
- ``condconv-k{K}-w{W}``, ``dyconv-k{K}-w{W}``, ``odconv-k{K}-w{W}``: the peer tags (``resnet18.condconv`` with
  ``experts=K``, ``.dyconv`` with ``kernels=K``, ``.odconv`` with ``kernel_num=K``), ``init="scratch"``: every
  non-stem 3x3 conv, experts drawn from scratch, as the papers train. DY-Conv's softmax temperature falls
  linearly from 30 to 1 over the first ``--dyconv-anneal`` of the training steps, as in its paper.

A new row is one ``define(name, model, **options)`` line; ``--rows`` picks rows of the table by name.

One recipe for every row (``kdna_fx.train``): SGD momentum 0.9, peak lr 0.1 after a linear warm-up, cosine to 0,
weight decay on conv/linear weights, label smoothing, batch 128, fp32, the training augmentation of
``fashion_mnist(train=True)`` (random 2-pixel shift, horizontal flip). The 10,000 test images are scored after
every epoch (never used to pick anything: the reported top-1 is the last epoch's).

Resumable at two levels. Each (row, seed) writes ``<out>/runs/<row>/seed<S>.json`` when it finishes and is
skipped when that file exists. Inside a run, kdna_fx.train checkpoints every epoch into ``<run-root>/<row>/
seed<S>/``; a stopped run resumes exactly from its last epoch. A per-run lock file keeps two processes off the
same run. ``--report`` (also run at the end of the queue) writes ``<out>/frontier.{json,md,png}``. ``--speed``
writes ``<out>/speed/<cpu>.json``, one file per CPU: the latency targets are judged on each CPU that timed the rows.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

import kdna_fx
from kdna_fx import peers
from kdna_fx.models import create_model
from kdna_fx.reporting import count_macs
from kdna_fx.timing import markdown_table, provenance, time_interleaved, write_results
from kdna_fx.train import TrainConfig, build_data, train
from kdna_fx.train.checkpoint import CHECKPOINT_NAME

from bench.common import (ABOVE, BELOW, REPO, TIE, DirtyTreeError, compare, machine_label, paired, paired_cell,
                          release_lock, run_provenance, write_json, take_lock)

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


# ------------------------------------------------------------------------------------------------ training


def train_config(row: Row, seed: int, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer="sgd", lr=args.lr,
                       weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                       label_smoothing=args.label_smoothing, amp="none", seed=seed, device=args.device,
                       limit_steps=args.limit_steps, progress=args.progress, log_every=50, model=row.spec())


def steps_per_epoch(n_train: int, args: argparse.Namespace) -> int:
    steps = n_train // args.batch_size  # the loader drops the last partial batch
    return min(steps, args.limit_steps or steps)


def study_commit(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """The commit the study runs from. "dirty" means the code differs from it (the study's own outputs under
    bench/results do not count): refused unless ``--force-dirty``, and then marked in every record."""
    try:
        return run_provenance(force_dirty=bool(args and args.force_dirty))["git"]
    except DirtyTreeError as exc:
        raise SystemExit(str(exc)) from None


def provenance_notes(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What a skeptic should know about where the records came from: runs from uncommitted code, commits the
    history does not hold, and CPU names that several machines may share (records older than host ids)."""
    records = [r for v in runs.values() for r in v]
    notes = []
    dirty = sorted(f"{r['row']} seed {r['seed']}" for r in records if (r.get("git") or {}).get("dirty"))
    if dirty:
        notes.append(f"{len(dirty)} of {len(records)} runs ran from uncommitted changes ({', '.join(dirty)})")
    unknown = sorted({c for r in records if (c := (r.get("git") or {}).get("commit")) and not _in_history(c)})
    if unknown:
        notes.append(f"{len(unknown)} recorded commit(s) are not in this history: {', '.join(u[:12] for u in unknown)}")
    no_host = sum("host_id" not in r["provenance"]["machine"] for r in records)
    if no_host:
        notes.append(f"{no_host} runs predate host ids: their CPU name (e.g. \"AMD EPYC\") may cover several "
                     f"machines")
    return notes


def _in_history(commit: str) -> bool:
    import subprocess

    done = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO, capture_output=True)
    return done.returncode == 0


def record_path(args: argparse.Namespace, row: Row, seed: int) -> str:
    return os.path.join(args.out, "runs", row.name, f"seed{seed}.json")


def run_dir(args: argparse.Namespace, row: Row, seed: int) -> str:
    return os.path.join(args.run_root, row.name, f"seed{seed}")


def run_one(row: Row, seed: int, args: argparse.Namespace, data: Any,
            on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train (or resume) one (row, seed) to the end and write its record; returns the record."""
    directory = run_dir(args, row, seed)
    config = train_config(row, seed, args)
    anneal = round(args.dyconv_anneal * steps_per_epoch(len(data.train), args) * args.epochs)
    torch.manual_seed(seed)
    model = build(row, anneal_steps=max(1, anneal))
    resume = os.path.exists(os.path.join(directory, CHECKPOINT_NAME))
    result = train(model, data.train, data.val, config, directory, resume=resume, on_epoch_end=on_epoch_end)
    history = result["history"]
    last = history[-1]
    record = {"row": row.name, "kind": row.kind, "width": row.width, "seed": seed, "label": row.label,
              "test_top1": last["val_top1"], "test_loss": last["val_loss"], "test_images": last["val_images"],
              "train_images": len(data.train), "params": n_params(model), "epochs": len(history),
              "train_seconds": sum(r["train_seconds"] for r in history), "resumed": resume,
              "config": config.to_dict(), "history": history, "run_dir": directory,
              "git": getattr(args, "git", None) or study_commit(args),  # the code that ran: the commit at start
              "provenance": provenance()}
    write_json(record_path(args, row, seed), record)
    return record


def run_queue(args: argparse.Namespace) -> None:
    rows = [Row.of(name) for name in args.rows]
    data = build_data("fashion-mnist", args.data, train_subset=args.train_subset or None,
                      val_subset=args.test_subset or None, seed=args.subset_seed)
    args.git = study_commit(args)
    jobs = [(row, seed) for seed in args.seeds for row in rows]  # seed-major: every row gets seed 0 first
    done = sum(os.path.exists(record_path(args, r, s)) for r, s in jobs)
    print(f"frontier study: {len(jobs)} runs, {done} done; {len(data.train):,} training images, "
          f"{len(data.val):,} test images, {args.epochs} epochs, {torch.get_num_threads()} torch thread(s)",
          flush=True)
    bar = tqdm(jobs, desc="runs", unit="run", initial=0, disable=not args.progress)
    for i, (row, seed) in enumerate(bar):
        if os.path.exists(record_path(args, row, seed)):
            continue
        directory = run_dir(args, row, seed)
        if not take_lock(directory):
            print(f"[{i + 1}/{len(jobs)}] {row.name} seed {seed}: another process holds {directory}/lock, "
                  f"skipped", flush=True)
            continue
        try:
            start = time.perf_counter()
            resumed = os.path.exists(os.path.join(directory, CHECKPOINT_NAME))
            print(f"[{i + 1}/{len(jobs)}] {row.name} seed {seed}{' (resuming)' if resumed else ''}", flush=True)
            record = run_one(row, seed, args, data)
            print(f"    test top-1 {record['test_top1']:.2f}% in {(time.perf_counter() - start) / 60:.1f} min",
                  flush=True)
        finally:
            release_lock(directory)


# ------------------------------------------------------------------------------------------------ estimate


def estimate(args: argparse.Namespace) -> None:
    """Time ``--estimate-steps`` training steps of every row (eager, as the queue trains) and project the run time."""
    rows = [Row.of(name) for name in args.rows]
    n_train = 60_000 if not args.train_subset else min(args.train_subset, 60_000)
    n_test = args.test_subset or 10_000
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    result = {}
    for row in tqdm(rows, desc="estimate", unit="row"):
        torch.manual_seed(0)
        model = build(row, anneal_steps=100)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        model.train()
        for _ in range(2):
            step()
        times = []
        for _ in range(args.estimate_steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        model.eval()
        with torch.no_grad():
            start = time.perf_counter()
            model(x)
            eval_step = time.perf_counter() - start
        s = statistics.median(times)
        epoch = s * steps_per_epoch(n_train, args) + eval_step * math.ceil(n_test / args.batch_size)
        result[row.name] = {"step_s": s, "epoch_s": epoch, "run_min": epoch * args.epochs / 60}
        tqdm.write(f"{row.name:>20}: {s:.3f} s/step, {epoch:.0f} s/epoch, {epoch * args.epochs / 60:.0f} min/run")
    total = sum(r["run_min"] for r in result.values()) * len(args.seeds)
    print(f"all {len(rows)} rows x {len(args.seeds)} seeds: about {total / 60:.1f} h at this machine's current load")
    write_json(os.path.join(args.out, "estimate.json"),
              {"rows": result, "batch_size": args.batch_size, "steps_timed": args.estimate_steps,
               "threads": torch.get_num_threads(), "provenance": provenance()})


# ------------------------------------------------------------------------------------------------ speed


def speed_path(out: str, cpu: str) -> str:
    """One timing file per CPU: batch-1 latency ratios differ between CPUs (the peers' most), so a re-timing on
    another machine adds a yardstick instead of replacing the last one; the same CPU's file is overwritten."""
    return os.path.join(out, "speed", re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") + ".json")


# Timings on disk that are not what they claim, by (file, row), each with its reason. The report leaves them out
# and says so; the files themselves stay as measured.
DISCARDED_TIMINGS: dict[tuple[str, str], str] = {
    ("speed/intel-r-xeon-r-processor.json", "plain-w0.5"):
        "ran uncompiled though marked compiled: it was the ninth graph on the plain rows' shared ResNet.forward, "
        "past dynamo's recompile limit (speed() now times every row as its own GraphModule)",
}


def load_timings(out: str) -> list[dict[str, Any]]:
    """Every CPU's last ``--speed`` record, newest first, without the entries in DISCARDED_TIMINGS."""
    directory = os.path.join(out, "speed")
    timings = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                record = json.load(f)
            file = f"speed/{name}"
            discarded = {row: why for (where, row), why in DISCARDED_TIMINGS.items()
                         if where == file and row in record["rows"]}
            timings.append({"cpu": record["provenance"]["machine"]["cpu"], "date_utc": record["provenance"]["date_utc"],
                            "file": file, "discarded": discarded,
                            "rows": {k: v for k, v in record["rows"].items() if k not in discarded}})
    return sorted(timings, key=lambda t: t["date_utc"], reverse=True)


def speed(args: argparse.Namespace) -> None:
    """Re-time every row in one process: batch-1 latency and batch-32 throughput of the deployable form, compiled
    (torch.compile, static shapes), rows interleaved (kdna_fx.timing.time_interleaved). Weights do not change the
    time, so each row is freshly built."""
    rows = [Row.of(name) for name in args.rows]
    one, batch = torch.randn(1, 1, 28, 28), torch.randn(32, 1, 28, 28)
    calls_b1: dict[str, Callable[[], Any]] = {}
    calls_b32: dict[str, Callable[[], Any]] = {}
    modes: dict[str, str] = {}
    # Dynamo keeps at most recompile_limit graphs per code object and past it runs the frame uncompiled, with only
    # a warning: the five plain widths at two batch sizes share ResNet.forward, and the last one was once timed
    # that way. So every row is timed as a GraphModule (its own forward code, as the KernelDNA and peer rows
    # already are), and a fallback raises instead of passing for compiled.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for row in tqdm(rows, desc="compile" if not args.eager else "build", unit="row"):
            model = deployable(row)
            model = model if isinstance(model, torch.fx.GraphModule) else kdna_fx.passes.trace(model)
            mode = "eager"
            if not args.eager:
                try:
                    compiled = torch.compile(model, dynamic=False)  # per-sample grouped convs need static shapes
                    with torch.inference_mode():
                        compiled(one), compiled(batch)
                    model, mode = compiled, "compiled"
                except Exception as exc:  # noqa: BLE001  (a row that does not compile is timed eagerly and marked)
                    mode = f"eager (compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                    tqdm.write(f"{row.name}: {mode}")
            modes[row.name] = mode
            calls_b1[row.name] = lambda m=model: m(one)
            calls_b32[row.name] = lambda m=model: m(batch)
        b1 = time_interleaved(calls_b1, warmup=5, repeat=args.speed_repeat, rounds=args.speed_rounds)
        b32 = time_interleaved(calls_b32, warmup=2, repeat=max(1, args.speed_repeat // 5), rounds=args.speed_rounds)
    result = {name: {"latency_b1_ms": 1e3 * b1[name]["median_s"], "latency_b1_iqr_rel": b1[name]["iqr_rel"],
                     "images_per_s_b32": 32 / b32[name]["median_s"], "b32_iqr_rel": b32[name]["iqr_rel"],
                     "mode": modes[name]} for name in calls_b1}
    prov = provenance()
    write_json(speed_path(args.out, prov["machine"]["cpu"]),
              {"rows": result, "rounds": args.speed_rounds, "repeat_b1": args.speed_repeat,
               "threads": torch.get_num_threads(), "timed_as": "GraphModule, dynamo fallbacks raise",
               "git": study_commit(args), "provenance": prov})
    for name, r in result.items():
        print(f"{name:>20}: b1 {r['latency_b1_ms']:.2f} ms, b32 {r['images_per_s_b32']:.0f} img/s ({r['mode']})")


# ------------------------------------------------------------------------------------------------ report


def _load_records(out: str) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    root = os.path.join(out, "runs")
    for row_name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for name in sorted(os.listdir(os.path.join(root, row_name))):
            if name.endswith(".json"):
                with open(os.path.join(root, row_name, name)) as f:
                    runs.setdefault(row_name, []).append(json.load(f))
    return runs


def _in_progress(args: argparse.Namespace, rows: list[Row]) -> list[str]:
    """Runs with a checkpoint but no record yet, and the epoch they reached."""
    found = []
    for row in rows:
        for seed in args.seeds:
            metrics = os.path.join(run_dir(args, row, seed), "metrics.json")
            if os.path.exists(metrics) and not os.path.exists(record_path(args, row, seed)):
                with open(metrics) as f:
                    epochs = len(json.load(f)["epochs"])
                found.append(f"{row.name} seed {seed} (epoch {epochs}/{args.epochs} done)")
    return found


def summarise(args: argparse.Namespace) -> dict[str, Any]:
    runs = _load_records(args.out)
    names = list(dict.fromkeys([*args.rows, *runs]))  # the queue's order, then any other row on disk
    timings = load_timings(args.out)
    timed = timings[0]["rows"] if timings else {}  # the table's and plots' own columns: the newest timing
    rows = []
    for name in tqdm(names, desc="costs", unit="row", disable=not args.progress):
        row = Row.of(name)
        entry: dict[str, Any] = {"row": name, "kind": row.kind, "width": row.width, "label": row.label,
                                 **cost(row), **timed.get(name, {})}
        mine = runs.get(name, [])
        if mine:
            mine = sorted(mine, key=lambda r: r["seed"])
            top1 = [r["test_top1"] for r in mine]
            entry.update(seeds=[r["seed"] for r in mine], top1=top1, top1_mean=statistics.fmean(top1),
                         top1_std=statistics.stdev(top1) if len(top1) > 1 else 0.0, top1_min=min(top1),
                         top1_max=max(top1),
                         top1_per_epoch=[statistics.fmean(epochs) for epochs in
                                         zip(*[[h["val_top1"] for h in r["history"]] for r in mine])],
                         train_s_per_epoch=statistics.fmean(r["train_seconds"] / r["epochs"] for r in mine))
        rows.append(entry)
    done = sum(len(v) for k, v in runs.items() if k in args.rows)
    trained_on = collections.Counter(machine_label(r["provenance"]["machine"]) for v in runs.values() for r in v)
    return {"rows": rows, "runs_done": done, "runs_total": len(args.rows) * len(args.seeds),
            "in_progress": _in_progress(args, [Row.of(n) for n in args.rows]),
            "trained_on": dict(trained_on.most_common()),
            "timings": [{**t, "rows": {n: {"latency_b1_ms": v["latency_b1_ms"]} for n, v in t["rows"].items()}}
                        for t in timings]}


def machines_text(summary: dict[str, Any]) -> str:
    """Which CPUs trained the runs and which one timed the rows: the report's own "Machine" line is neither."""
    trained = ", ".join(f"{cpu} ({n} run{'s' if n > 1 else ''})" for cpu, n in summary["trained_on"].items())
    text = f"Machines: the runs trained on {trained or 'no machine yet'}"
    if len(summary["trained_on"]) > 1:
        text += (", so \"train s/epoch\" compares machines as well as rows (the recipe is the same; the numbers "
                 "are not bit-identical across CPUs)")
    timings = summary["timings"]  # newest first: the newest fills the table's columns
    text += (f". The latency and throughput columns were timed on {timings[0]['cpu']} ({timings[0]['date_utc']} UTC)"
             if timings else ". No row has been timed yet (`--speed`)")
    older = [f"{t['cpu']} ({t['date_utc']} UTC, `{t['file']}`)" for t in timings[1:]]
    if older:
        text += f"; the latency targets and plots are also read on {', '.join(older)}"
    for t in timings:
        for row, why in t["discarded"].items():
            text += f". Left out: `{row}` in `{t['file']}`, which {why}"
    return text + ". The \"Machine\" line below is the one that wrote this report."


def plain_curve(rows: list[dict[str, Any]], key: str, value: str = "top1_mean") -> list[tuple[float, float]]:
    """(cost, ``value``) of the plain rows done, by cost: the curve every other row is read against."""
    return sorted((r[key], r[value]) for r in rows if r["kind"] == "plain" and value in r and key in r)


def curve_at(curve: list[tuple[float, float]], x: float) -> float | None:
    """The curve's value at cost ``x``, linear in log cost between its points; None outside it."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return None


def gain_over(curve: list[tuple[float, float]], r: dict[str, Any], key: str) -> float | None:
    """Row ``r``'s mean top-1 minus the curve's at the row's ``key`` cost; None outside the curve or untimed."""
    at = curve_at(curve, r[key]) if key in r else None
    return None if at is None else r["top1_mean"] - at


def _delta(r: dict[str, Any], curve: list[tuple[float, float]], key: str) -> str:
    if r["kind"] == "plain" or "top1_mean" not in r or key not in r:
        return ""
    gain = gain_over(curve, r, key)
    return f"{gain:+.2f}" if gain is not None else "outside"


def recipe_text(args: argparse.Namespace, n_train: str) -> str:
    return (f"Recipe (every row): Fashion-MNIST, {n_train} training images, the 10,000 test images scored after "
            f"every epoch (the reported top-1 is the last epoch's), {args.epochs} epochs, batch {args.batch_size}, "
            f"SGD momentum 0.9, peak lr {args.lr:g} after a {args.warmup_epochs:g}-epoch linear warm-up, cosine to "
            f"0 (per step), weight decay {args.weight_decay:g} on conv/linear weights (none on norms, biases and "
            f"KernelDNA adapters), label smoothing {args.label_smoothing:g}, fp32, augmentation: random 2-pixel "
            f"shift and horizontal flip. Small stem (3x3 stride-1 conv, no max-pool). Peers: experts from scratch "
            f"(Kaiming); DY-Conv temperature 30 -> 1 over the first {100 * args.dyconv_anneal:g}% of the steps. "
            f"Seeds change the initialisation, data order and augmentation.")


def table(summary: dict[str, Any], args: argparse.Namespace) -> str:
    rows = summary["rows"]
    by_params, by_macs = plain_curve(rows, "params"), plain_curve(rows, "macs")
    by_latency = plain_curve(rows, "latency_b1_ms")
    lines = []
    for r in rows:
        if "top1_mean" in r:
            spread = f" ± {r['top1_std']:.2f} [{r['top1_min']:.2f}, {r['top1_max']:.2f}]" if len(r["seeds"]) > 1 else ""
            top1, seeds = f"{r['top1_mean']:.2f}{spread}", str(len(r["seeds"]))
        else:
            top1, seeds = "pending", "0"
        lines.append([f"`{r['row']}`", r["label"], f"{r['params']:,}",
                      f"{r['macs'] / 1e6:.2f} ({r['extra_macs'] / 1e6:.2f})", seeds, top1,
                      _delta(r, by_params, "params"), _delta(r, by_macs, "macs"),
                      f"{r['latency_b1_ms']:.2f} (IQR {100 * r['latency_b1_iqr_rel']:.0f}%)" if "latency_b1_ms" in r
                      else "-",
                      f"{r['images_per_s_b32']:.0f}" if "images_per_s_b32" in r else "-",
                      _delta(r, by_latency, "latency_b1_ms"),
                      f"{r['train_s_per_epoch']:.0f}" if "train_s_per_epoch" in r else "-"])
    return markdown_table(["row", "model", "params", "MMACs (gates/heads)", "seeds", "test top-1 %",
                           "vs plain @ params", "vs plain @ MACs", "b1 ms", "b32 img/s", "vs plain @ b1 ms",
                           "train s/epoch"], lines)


def plain_range_at(rows: list[dict[str, Any]], key: str, x: float) -> list[float] | None:
    """[worst, best] of the plain curve at cost ``x``: the curves through each plain width's worst and best seed,
    interpolated as the mean curve is; None outside the curve."""
    lo, hi = (curve_at(plain_curve(rows, key, v), x) for v in ("top1_min", "top1_max"))
    return None if lo is None or hi is None else [lo, hi]


def gains(curve: list[tuple[float, float]], r: dict[str, Any], key: str) -> list[float] | None:
    """Each seed's top-1 minus the mean plain curve at the row's ``key`` cost; None outside the curve."""
    at = curve_at(curve, r[key]) if key in r else None
    return None if at is None else [v - at for v in r["top1"]]


def _latency_targets(rows: list[dict[str, Any]], mean_l: list[tuple[float, float]], r: dict[str, Any],
                     peers_done: list[dict[str, Any]], missing_peers: list[str]) -> tuple[Any, Any]:
    """Targets 2 and 3 for KernelDNA row ``r`` under one CPU's timing: ``rows`` carry that CPU's latencies,
    ``mean_l`` is its plain curve and ``peers_done`` the peer rows on it. Both through bench.common.compare."""
    gain_l = gain_over(mean_l, r, "latency_b1_ms")
    latency = None
    if gain_l is not None:
        outcome = compare(r["top1"], plain_range_at(rows, "latency_b1_ms", r["latency_b1_ms"]))
        latency = {"gain": gain_l, "outcome": outcome, "met": outcome == ABOVE}
    elif "latency_b1_ms" in r:
        # Beyond the plain curve there is nothing to interpolate, but a plain width that is faster and whose
        # every seed beats every seed of the row settles it: wider plain nets have only gained accuracy here.
        dominating = [p for p in rows if p["kind"] == "plain" and "latency_b1_ms" in p
                      and p["latency_b1_ms"] <= r["latency_b1_ms"] and compare(p["top1"], r["top1"]) == ABOVE]
        if dominating:
            latency = {"gain": None, "outcome": BELOW, "met": False,
                       "dominated_by": max(dominating, key=lambda p: p["top1_mean"])["row"]}
    mine = gains(mean_l, r, "latency_b1_ms")
    theirs = {p["row"]: g for p in peers_done if (g := gains(mean_l, p, "latency_b1_ms")) is not None}
    if mine is None or not theirs:
        peers_verdict = None if mine is None else "no peer row read against the plain curve yet"
    else:
        outcomes = {name: compare(mine, g) for name, g in theirs.items()}
        best_peer = max(theirs, key=lambda name: sum(theirs[name]) / len(theirs[name]))
        peers_verdict = {"gain": gain_l, "best_peer": best_peer,
                         "best_peer_gain": sum(theirs[best_peer]) / len(theirs[best_peer]),
                         "outcomes": outcomes, "outcome": _weakest(outcomes.values()),
                         "met": all(o == ABOVE for o in outcomes.values()), "missing": missing_peers}
    return latency, peers_verdict


def _weakest(outcomes: Any) -> str:
    """The outcome against the set: below any one is below, else a tie with any one is a tie."""
    outcomes = list(outcomes)
    return BELOW if BELOW in outcomes else TIE if TIE in outcomes else ABOVE


def _with_timing(rows: list[dict[str, Any]], timing: dict[str, Any]) -> list[dict[str, Any]]:
    """``rows`` with one CPU's batch-1 latencies in place of the newest timing's (absent where it timed none)."""
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "latency_b1_ms"}
        if r["row"] in timing["rows"]:
            r["latency_b1_ms"] = timing["rows"][r["row"]]["latency_b1_ms"]
        out.append(r)
    return out


def paired_text(summary: dict[str, Any]) -> str:
    """Each row against the plain net of its width, seed by seed (a seed fixes the data order and augmentation
    for every row): bench.common.paired beside the seed ranges. The targets above read rows against the plain
    curve, which no seed pairs with; this table is the comparison the seeds allow."""
    found = {r["row"]: r for r in summary["rows"] if "top1" in r}
    lines = []
    for r in found.values():
        plain = next((p for p in found.values() if p["kind"] == "plain" and p["width"] == r["width"]), None)
        if r["kind"] == "plain" or plain is None:
            continue
        p = paired(dict(zip(r["seeds"], r["top1"])), dict(zip(plain["seeds"], plain["top1"])))
        lines.append([f"`{r['row']}`", f"`{plain['row']}`", f"{min(r['top1']):.2f}-{max(r['top1']):.2f} vs "
                      f"{min(plain['top1']):.2f}-{max(plain['top1']):.2f}", paired_cell(p)])
    if not lines:
        return ""
    return ("Against the plain net of the same width, paired by seed (bench.common.paired: mean and 95 % t interval "
            "of the differences; fewer than 3 pairs reported, not judged):\n\n"
            + markdown_table(["row", "plain", "top-1 ranges", "paired difference [95 % interval], n"], lines))


def targets(summary: dict[str, Any], seeds: int) -> list[dict[str, Any]]:
    """The issue's three targets, judged for each KernelDNA row from what is on disk, every "met" by the one
    rule of bench.common.compare (seed ranges disjoint):

    1. at equal parameters, at least +1 point over the plain curve (mean against mean) and the row's worst seed
       above the plain curve's best (the curve through each plain width's best seed);
    2. at equal batch-1 latency, no worse than the plain curve: met only when the row's worst seed is above the
       plain curve's best there (a tie shows nothing either way); a row slower than every plain width is
       missed where a faster plain width beats it on every seed;
    3. above every peer at equal latency. Rows and peers lie at different latencies, so both are read against
       the one yardstick between them, the plain curve: every seed's gain over it must beat every seed's gain of
       every peer.
    Targets 2 and 3 are judged once per CPU in ``summary["timings"]`` (keyed by CPU, newest first), since
    latency ratios are a property of the CPU as much as of the nets.
    A verdict is "provisional" while the row, a plain width or a peer has fewer than ``seeds`` seeds.
    """
    rows = [r for r in summary["rows"] if "top1_mean" in r]
    mean_p = plain_curve(rows, "params")
    thin_yardsticks = any(len(r["seeds"]) < seeds for r in rows if r["kind"] == "plain" or r["kind"] in PEERS)
    per_cpu = []
    for timing in summary.get("timings", []):
        timed = _with_timing(rows, timing)
        mean_l = plain_curve(timed, "latency_b1_ms")
        peers_done = [r for r in timed if r["kind"] in PEERS and gain_over(mean_l, r, "latency_b1_ms") is not None]
        missing = sorted(set(PEERS) - {r["kind"] for r in peers_done})
        per_cpu.append((timing["cpu"], timed, mean_l, peers_done, missing))
    out = []
    for r in rows:
        if r["kind"] not in KERNELDNA:
            continue
        entry: dict[str, Any] = {"row": r["row"], "seeds": len(r["seeds"]),
                                 "provisional": len(r["seeds"]) < seeds or thin_yardsticks,
                                 "latency": {}, "peers": {}}
        gain = gain_over(mean_p, r, "params")
        if gain is None:
            entry["params"] = None
        else:
            outcome = compare(r["top1"], plain_range_at(rows, "params", r["params"]))
            entry["params"] = {"gain": gain, "outcome": outcome, "disjoint": outcome == ABOVE,
                               "met": gain >= 1.0 and outcome == ABOVE}
        for cpu, timed, mean_l, peers_done, missing in per_cpu:
            mine = next(t for t in timed if t["row"] == r["row"])
            entry["latency"][cpu], entry["peers"][cpu] = _latency_targets(timed, mean_l, mine, peers_done, missing)
        out.append(entry)
    return out


def targets_text(verdicts: list[dict[str, Any]], seeds: int) -> str:
    """The targets as a Markdown table, one row per KernelDNA row; the latency targets once per timing CPU."""
    def cell(v: dict[str, Any] | str | None, text: Callable[[dict[str, Any]], str]) -> str:
        if v is None:  # no plain width on one side of it: more seeds will not change that, a wider plain row would
            return "not judged (outside the plain curve)"
        if isinstance(v, str):
            return f"pending ({v})"
        if v["met"]:
            word = "**met** so far" if v.get("missing") else "**met**"
        else:
            word = {BELOW: "missed", TIE: "not met: tie, seed ranges overlap"}.get(v["outcome"], "missed")
        return f"{word} ({text(v)})"

    def per_cpu(by_cpu: dict[str, Any], text: Callable[[dict[str, Any]], str]) -> str:
        if not by_cpu:
            return "pending (not timed yet: `--speed`)"
        if len(by_cpu) == 1:
            return cell(next(iter(by_cpu.values())), text)
        return "<br>".join(f"{cpu}: {cell(v, text)}" for cpu, v in by_cpu.items())

    def params_text(p: dict[str, Any]) -> str:
        return f"{p['gain']:+.2f}" + (", ranges disjoint" if p["outcome"] != TIE else "")  # a tie says "overlap"

    def latency_text(p: dict[str, Any]) -> str:
        if p["gain"] is None:
            return f"outside the plain curve, but `{p['dominated_by']}` is faster and better on every seed"
        return f"{p['gain']:+.2f}"

    def peers_text(p: dict[str, Any]) -> str:
        missing = f"; no {', '.join(p['missing'])} yet" if p["missing"] else ""
        digits = 3 if f"{p['gain']:+.2f}" == f"{p['best_peer_gain']:+.2f}" else 2  # show which side a near-tie falls
        return f"{p['gain']:+.{digits}f} vs {p['best_peer']} {p['best_peer_gain']:+.{digits}f}{missing}"

    lines = []
    for v in verdicts:
        lines.append([f"`{v['row']}`", cell(v["params"], params_text),
                      per_cpu(v["latency"], latency_text),
                      per_cpu(v["peers"], peers_text),
                      f"{v['seeds']}" + (" (provisional)" if v["provisional"] else "")])
    head = (f"Targets (issue 11), judged by `targets()` from the runs on disk with the one rule of every study "
            f"(bench.common.compare): a target is met only when the seed ranges are disjoint on the right side; "
            f"overlapping ranges are a tie, which meets nothing. \"provisional\" while the row, a plain width or a "
            f"peer has fewer than {seeds} seeds. Gains are points of mean top-1 over the mean plain curve at the "
            f"row's cost; the plain curve's seed range there is interpolated between the plain widths' worst and "
            f"best seeds. Peers lie at other latencies, so a row beats a peer when every seed's gain over the plain "
            f"curve at equal latency beats every seed's gain of that peer. The latency targets are judged on every "
            f"CPU that timed the rows (`speed/`), newest first.")
    table_md = markdown_table(["row", "+1 point @ params, seed ranges disjoint", "no worse @ b1 ms",
                               "above every peer @ b1 ms", "seeds"], lines)
    return head + "\n\n" + (table_md if lines else "No KernelDNA row has finished a run yet.")


def plot(summary: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from adjustText import adjust_text
    from matplotlib.ticker import FuncFormatter

    style = {"plain": ("black", "o"), "replace": ("tab:blue", "s"), "kdna": ("tab:green", "D"),
             "relaxed": ("tab:cyan", "P"), "condconv": ("tab:orange", "^"), "dyconv": ("tab:red", "v"),
             "odconv": ("tab:purple", "X")}
    done = [r for r in summary["rows"] if "top1_mean" in r]
    panels = [(done, "params", "parameters (thousands)", 1e-3), (done, "macs", "MACs per 28x28 image (millions)", 1e-6)]
    # one latency panel per CPU that timed the rows, newest first: the ratios differ between CPUs
    timings = summary.get("timings") or [{"cpu": "CPU", "date_utc": "not timed yet", "rows": {}}]
    panels += [(_with_timing(done, t), "latency_b1_ms",
                f"batch-1 latency, ms (compiled, {t['cpu']}, {t['date_utc'][:10]})", 1.0) for t in timings]
    ncols = 3 if len(panels) <= 3 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols + (1 if ncols == 2 else 0), 5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel_rows, key, xlabel, scale) in zip(axes.flat, panels):
        have = [r for r in panel_rows if key in r]
        curve = plain_curve(have, key)
        labels, avoid_x, avoid_y = [], [], []
        if len(curve) > 1:
            ax.plot([x * scale for x, _ in curve], [y for _, y in curve], color="black", lw=1, alpha=0.6,
                    label="plain ResNet-18 widths")
        for kind in style:
            color, marker = style[kind]
            mine = [r for r in have if r["kind"] == kind]
            for i, r in enumerate(mine):
                x = r[key] * scale
                ax.errorbar(x, r["top1_mean"],
                            yerr=[[r["top1_mean"] - r["top1_min"]], [r["top1_max"] - r["top1_mean"]]],
                            color=color, marker=marker, capsize=3, linestyle="none",
                            label=KINDS[kind] if i == 0 else None)
                # a label must not hide a seed range: its ends repel the labels too
                avoid_x += [x, x]
                avoid_y += [r["top1_min"], r["top1_max"]]
                labels.append(ax.text(x, r["top1_mean"], f"{r['row']} ({len(r['seeds'])})", fontsize=7))
        if not have:
            ax.text(0.5, 0.5, "no timings yet: run --speed" if done else "no finished runs yet",
                    ha="center", transform=ax.transAxes)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 100, not 10^2
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
        ax.set_xlabel(xlabel + " (log scale)")
        ax.set_ylabel("test top-1 % (mean; bars: min-max over seeds)")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")  # the cheap, weak peers sit bottom right
        if labels:
            # last, once the limits are final: rows of about equal cost would otherwise print over each other
            adjust_text(labels, x=avoid_x, y=avoid_y, ax=ax, arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args: argparse.Namespace) -> None:
    summary = summarise(args)
    summary["targets"] = targets(summary, len(args.seeds))
    n_train = f"{args.train_subset:,} (seeded subset)" if args.train_subset else "all 60,000"
    status = (f"**Status: {summary['runs_done']} of {summary['runs_total']} runs done** "
              f"({len(args.rows)} rows x seeds {', '.join(map(str, args.seeds))})."
              + (f" In progress: {'; '.join(summary['in_progress'])}." if summary["in_progress"] else ""))
    timing_note = ("Timing (`--speed`): the deployable form (KernelDNA rows folded), eval mode, torch.compile with "
                   "static shapes, all rows interleaved in one process (kdna_fx.timing.time_interleaved), median; "
                   "1 torch thread on a shared 2-core CPU, so read ratios, not absolute numbers. "
                   "\"vs plain @ params\" / \"@ MACs\" / \"@ b1 ms\": this row's mean top-1 minus the plain-net "
                   "curve's, linearly interpolated in log cost between the plain widths done; \"outside\" where the "
                   "row's cost lies beyond them. MMACs: one 1x28x28 image, in parentheses the part inside KernelDNA "
                   "gates or the peers' attention heads and kernel mixtures.")
    md = "\n\n".join([f"### Fashion-MNIST frontier: ResNet-18 family, {n_train} training images, {args.epochs} epochs",
                      status, recipe_text(args, n_train), table(summary, args), timing_note, machines_text(summary),
                      targets_text(summary["targets"], len(args.seeds)), paired_text(summary),
                      "![top-1 against parameters, MACs and batch-1 latency](frontier.png)"])
    prov = provenance(["-m", "bench.frontier_study", *args.argv])
    git = study_commit(args)
    notes = provenance_notes(_load_records(args.out))
    if notes:
        md += "\n\nProvenance of the records: " + "; ".join(notes) + "."
    md += f"\n\nGit commit: `{git['commit']}`{' (with uncommitted changes)' if git['dirty'] else ''}"
    os.makedirs(args.out, exist_ok=True)
    write_results(os.path.join(args.out, "frontier"),
                  {**summary, "settings": {k: v for k, v in vars(args).items()}, "git": git, "provenance": prov}, md)
    plot(summary, os.path.join(args.out, "frontier.png"),
         f"Fashion-MNIST, {n_train} train images, {args.epochs} epochs; {summary['runs_done']} of "
         f"{summary['runs_total']} runs done (seeds per point in parentheses)")
    print(md)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="frontier",
                   help="the defaults of rows, seeds, epochs, data, warm-up and folders (options below override)")
    p.add_argument("--rows", nargs="+", help=f"rows in queue order (frontier: {' '.join(ROWS)})")
    p.add_argument("--seeds", nargs="+", type=int, help="one run per seed and row")
    p.add_argument("--epochs", type=int, help="training epochs of every run (frontier: 15)")
    p.add_argument("--train-subset", type=int, help="training images, a seeded random subset (0: all 60,000)")
    p.add_argument("--test-subset", type=int, default=0, help="test images, a seeded subset (0: all 10,000)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subsets; the same for every run")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up before the cosine (frontier: 1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="conv/linear weights only")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--dyconv-anneal", type=float, default=0.1,
                   help="fraction of the training steps over which DY-Conv's temperature falls from 30 to 1")
    p.add_argument("--limit-steps", type=int, default=None, help="at most N steps per epoch (smoke runs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the recipe is fp32 on both)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 because the 2 cores are shared with other jobs (2 oversubscribe them)")
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    p.add_argument("--out", help="results folder (frontier: bench/results/frontier)")
    p.add_argument("--run-root", help="checkpoints of the runs, gitignored (frontier: runs/frontier)")
    p.add_argument("--progress", action="store_true", help="progress bars inside each run (noisy in a log)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--report", action="store_true", help="only write the table and plots from what is on disk")
    mode.add_argument("--speed", action="store_true", help="re-time every row (compiled, interleaved), then report")
    mode.add_argument("--estimate", action="store_true", help="time a few training steps of every row")
    p.add_argument("--estimate-steps", type=int, default=5, help="timed training steps per row for --estimate")
    p.add_argument("--speed-rounds", type=int, default=5, help="interleaved rounds of --speed")
    p.add_argument("--speed-repeat", type=int, default=50, help="batch-1 calls per row and round (batch 32: /5)")
    p.add_argument("--eager", action="store_true", help="--speed without torch.compile (quick checks)")
    p.add_argument("--force-dirty", action="store_true",
                   help="run or report from a tree with uncommitted changes (the records are marked dirty)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in args.rows:
        Row.of(name)  # a bad row name fails here, before any work
    if args.epochs < 1 or args.batch_size < 2:
        p.error(f"--epochs must be >= 1 and --batch-size >= 2, got {args.epochs} and {args.batch_size}")
    if not 0 < args.dyconv_anneal <= 1:
        p.error(f"--dyconv-anneal must be in (0, 1], got {args.dyconv_anneal}")
    if len(set(args.rows)) != len(args.rows) or len(set(args.seeds)) != len(args.seeds):
        p.error("--rows and --seeds must not repeat an entry")
    args.out = os.path.join(REPO, args.out) if not os.path.isabs(args.out) else args.out
    args.run_root = os.path.join(REPO, args.run_root) if not os.path.isabs(args.run_root) else args.run_root
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.estimate:
        estimate(args)
        return 0
    if args.speed:
        speed(args)
    elif not args.report:
        run_queue(args)
        preset = PRESETS[args.preset]
        if (args.rows, args.seeds) != (preset["rows"], preset["seeds"]):
            # A report of the narrowed queue would list only its rows and judge "provisional" by its seeds, and
            # would overwrite the study's report in a shared results folder: several narrowed queues run at once.
            print(f"narrowed queue (--rows/--seeds): {args.out}'s report left as it was; write it with "
                  f"--report and this command's other options (without --rows/--seeds)", flush=True)
            return 0
    report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
