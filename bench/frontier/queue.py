"""The frontier study's queue: one resumable training run per (row, seed) under a lock, the commit the study runs
from, what a skeptic should know about the records' provenance, and ``--estimate``."""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from kdna_fx.timing import provenance
from kdna_fx.train import TrainConfig, build_data, train
from kdna_fx.train.checkpoint import CHECKPOINT_NAME

from bench.common import REPO, DirtyTreeError, release_lock, run_provenance, take_lock, write_json
from bench.frontier.rows import Row, build, n_params

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
    unknown = sorted({c for r in records if (c := (r.get("git") or {}).get("commit")) and not in_history(c)})
    if unknown:
        notes.append(f"{len(unknown)} recorded commit(s) are not in this history: {', '.join(u[:12] for u in unknown)}")
    no_host = sum("host_id" not in r["provenance"]["machine"] for r in records)
    if no_host:
        notes.append(f"{no_host} runs predate host ids: their CPU name (e.g. \"AMD EPYC\") may cover several "
                     f"machines")
    return notes


def in_history(commit: str) -> bool:
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
