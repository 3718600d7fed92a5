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
import os
import sys

import torch

from kdna_fx.timing import write_results

from bench.common import REPO, DirtyTreeError, report_provenance
from bench.frontier.plot import plot
from bench.frontier.queue import estimate, provenance_notes, run_queue
from bench.frontier.rows import PRESETS, ROWS, Row
from bench.frontier.speed import speed
from bench.frontier.verdicts import (load_records, machines_text, paired_text, recipe_text, summarise, table, targets,
                                     targets_text)


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
    try:  # a run's report names the commit that ran (committed code only); --report keeps the stored one
        prov = report_provenance(os.path.join(args.out, "frontier"), ["-m", "bench.frontier_study", *args.argv],
                                 out=args.out, report_only=args.report, force_dirty=args.force_dirty)
    except DirtyTreeError as exc:
        raise SystemExit(str(exc)) from None
    git = prov["git"]
    notes = provenance_notes(load_records(args.out))
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
