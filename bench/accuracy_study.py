"""Accuracy study (issue 3): does KernelDNA sharing beat simply shrinking? Fashion-MNIST, CPU.

    .venv/bin/python bench/accuracy_study.py            # the committed study (defaults below)
    .venv/bin/python bench/accuracy_study.py --epochs 1 --train-subset 256 --out /tmp/acc_dry   # smoke run

Rows, all with the small-image stem, the same recipe, the same training subset and the same seeds:

1. ``resnet18`` at ``--width``                      plain ResNet-18
2. ``replace_resnet18`` at ``--width``              kdna_fx.transform of row 1 (sharing within the original depth)
3. ``kdna_resnet18`` at ``--width``                 the reference KernelDNA topology (stages 3-4 grow to 3 blocks)
4. ``resnet18`` narrowed                             plain ResNet-18 at the width whose parameter count is closest
                                                      to row 2's (searched over ``--search-widths``): the control

Each (row, seed) is trained from scratch with kdna_fx.train.train (SGD + momentum, per-step warm-up + cosine,
label smoothing, weight decay on conv/linear weights only) on a seeded subset of the 60,000 training images,
then evaluated on the full 10,000-image test split. Per row: parameters, MACs (kdna_fx.report.count_macs, one
1x28x28 image, eval mode), top-1 mean / std / min / max over seeds, training images/s (all epochs, data loading
included) and inference images/s (eval mode, no_grad, a fixed batch of ``--infer-batch`` images, median of
``--infer-repeat`` calls; no data loading).

Writes <out>/<stem>.{json,md,png}: every run's numbers and history, the table, the exact command, machine and
versions. Runs are interleaved (seed-major: every model of seed 0, then of seed 1, ...) so that slow phases of a
shared machine spread over all rows rather than landing on one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdna_fx.timing import markdown_table, provenance, time_call, write_results
from kdna_fx.models import create_model
from kdna_fx.report import count_macs
from kdna_fx.train import TrainConfig, build_data, evaluate, train

DEFAULTS = dict(epochs=3, width=0.25, seeds=[0, 1, 2], train_subset=10000, subset_seed=0, batch_size=128, lr=0.1,
                weight_decay=1e-4, warmup_epochs=0.25, label_smoothing=0.1, threads=1, infer_batch=256,
                infer_repeat=10, search_widths="0.05:0.5:0.0025")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in --help."""


def _spec(name: str, width: float) -> dict[str, Any]:
    return {"name": name, "num_classes": 10, "in_chans": 1, "small_stem": True, "width": width}


def _build(spec: dict[str, Any]) -> torch.nn.Module:
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return create_model(spec["name"], **kwargs)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a shared parent kernel is one Parameter: counted once


def _grid(text: str) -> list[float]:
    start, stop, step = (float(v) for v in text.split(":"))
    n = int(round((stop - start) / step))
    return [round(start + i * step, 6) for i in range(n + 1)]


def matched_width(target: int, widths: list[float]) -> tuple[float, int, list[dict[str, Any]]]:
    """The width whose plain small-stem ResNet-18 has the parameter count closest to ``target``."""
    searched = []
    for w in widths:
        searched.append({"width": w, "params": _n_params(_build(_spec("resnet18", w)))})
    best = min(searched, key=lambda r: (abs(r["params"] - target), r["width"]))
    return best["width"], best["params"], searched


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    d = DEFAULTS
    parser.add_argument("--epochs", type=int, default=d["epochs"], help="training epochs per run")
    parser.add_argument("--width", type=float, default=d["width"], help="width of rows 1-3")
    parser.add_argument("--seeds", type=int, nargs="+", default=d["seeds"],
                        help="one training run per seed and row (model init, data order, augmentation)")
    parser.add_argument("--train-subset", type=int, default=d["train_subset"],
                        help="training images, a seeded random subset of the 60,000 (0: all)")
    parser.add_argument("--subset-seed", type=int, default=d["subset_seed"],
                        help="seed of the training subset; the same subset for every run")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help="training batch")
    parser.add_argument("--lr", type=float, default=d["lr"], help="peak SGD learning rate")
    parser.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="conv/linear weights only")
    parser.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"], help="linear warm-up, then cosine")
    parser.add_argument("--label-smoothing", type=float, default=d["label_smoothing"], help="cross-entropy smoothing")
    parser.add_argument("--threads", type=int, default=d["threads"],
                        help="torch intra-op threads. 1 by default: on the shared 2-core machine (another job "
                             "running) 2 threads oversubscribed the cores and trained up to 5x slower, 1 did not")
    parser.add_argument("--infer-batch", type=int, default=d["infer_batch"], help="batch of the inference timing")
    parser.add_argument("--infer-repeat", type=int, default=d["infer_repeat"], help="timed inference calls (median)")
    parser.add_argument("--search-widths", default=d["search_widths"],
                        help="start:stop:step grid searched for row 4's parameter-matched width")
    parser.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="output folder")
    parser.add_argument("--stem", default="accuracy_fashion_mnist", help="output file name stem")
    args = parser.parse_args(argv)
    argv_used = list(argv) if argv is not None else sys.argv[1:]

    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    data = build_data("fashion-mnist", args.data, train_subset=args.train_subset or None, seed=args.subset_seed)
    val_loader = DataLoader(data.val, batch_size=256, shuffle=False)

    # Rows 1-3 at --width; row 4 at the width whose parameter count is closest to row 2's.
    base_specs = [("1 plain ResNet-18", _spec("resnet18", args.width)),
                  ("2 replace mode", _spec("replace_resnet18", args.width)),
                  ("3 reference KernelDNA", _spec("kdna_resnet18", args.width))]
    replace_params = _n_params(_build(base_specs[1][1]))
    narrow_w, narrow_params, searched = matched_width(replace_params, _grid(args.search_widths))
    rows = base_specs + [(f"4 plain ResNet-18, narrowed to row 2's params", _spec("resnet18", narrow_w))]
    print(f"row 2 (replace_resnet18, width {args.width}) has {replace_params:,} parameters; the closest plain "
          f"ResNet-18 is width {narrow_w} with {narrow_params:,} ({100 * (narrow_params / replace_params - 1):+.1f}%)",
          flush=True)

    example = torch.randn(1, 1, 28, 28)
    row_info = []
    for label, spec in rows:
        model = _build(spec)
        macs, gate_macs = count_macs(model, example)
        row_info.append({"row": label, "spec": spec, "params": _n_params(model), "macs": macs,
                         "gate_macs": gate_macs})

    runs = []
    jobs = [(seed, i) for seed in args.seeds for i in range(len(rows))]
    tmp_root = tempfile.mkdtemp(prefix="kdna_accuracy_study_")
    bar = tqdm(jobs, desc="runs", unit="run")
    for seed, i in bar:
        label, spec = rows[i]
        bar.set_postfix(model=spec["name"], width=spec["width"], seed=seed)
        torch.manual_seed(seed)
        model = _build(spec)
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer="sgd", lr=args.lr,
                             weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                             label_smoothing=args.label_smoothing, amp="none", seed=seed, device="cpu",
                             progress=False, model=spec)
        run_dir = os.path.join(tmp_root, f"row{i + 1}_seed{seed}")
        result = train(model, data.train, None, config, run_dir)
        history = result["history"]
        train_images = sum(r["train_images"] for r in history)
        train_seconds = sum(r["train_seconds"] for r in history)
        test = evaluate(model, val_loader, device=torch.device("cpu"))
        model.eval()
        x = torch.randn(args.infer_batch, 1, 28, 28)
        timing = time_call(lambda: model(x), warmup=3, repeat=args.infer_repeat)
        run = {"row": label, "model": spec["name"], "width": spec["width"], "seed": seed,
               "test_top1": test["top1"], "test_loss": test["loss"], "test_images": test["images"],
               "eval_loop_images_per_s": test["images_per_s"],
               "train_images_per_s": train_images / train_seconds, "train_seconds": train_seconds,
               "infer_images_per_s": args.infer_batch / timing["median_s"], "infer_timing": timing,
               "history": history}
        runs.append(run)
        tqdm.write(f"  {label} seed {seed}: test top-1 {test['top1']:.2f}%, train {run['train_images_per_s']:.0f} "
                   f"img/s, inference {run['infer_images_per_s']:.0f} img/s")
    bar.close()
    shutil.rmtree(tmp_root, ignore_errors=True)  # the runs' checkpoints; every number kept is in the JSON

    summaries = []
    for info in row_info:
        mine = [r for r in runs if r["row"] == info["row"]]
        summaries.append({**info, "top1": _summary([r["test_top1"] for r in mine]),
                          "train_images_per_s": _summary([r["train_images_per_s"] for r in mine]),
                          "infer_images_per_s": _summary([r["infer_images_per_s"] for r in mine])})
    wall = time.perf_counter() - wall_start

    n_train = len(data.train)
    header = (f"### Fashion-MNIST accuracy study: {n_train:,} training images (subset seed {args.subset_seed}), "
              f"full {len(data.val):,}-image test split, {args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}"
              f"\n\nSmall stem, SGD lr {args.lr:g} (momentum 0.9, warm-up {args.warmup_epochs:g} epoch + cosine), "
              f"batch {args.batch_size}, weight decay {args.weight_decay:g} (conv/linear weights), label smoothing "
              f"{args.label_smoothing:g}, fp32, CPU, {args.threads} torch threads. Top-1 is mean ± sample std "
              f"[min, max] over seeds. Train img/s: all epochs incl. data loading; inference img/s: eval mode, "
              f"batch {args.infer_batch}, median of {args.infer_repeat}; both means over seeds. "
              f"MACs: one 1x28x28 image (gate MACs in parentheses). Wall time of the study: {wall / 60:.1f} min.\n\n")
    table_rows = []
    for s in summaries:
        t = s["top1"]
        table_rows.append([s["row"], f"`{s['spec']['name']}`", f"{s['spec']['width']:g}", f"{s['params']:,}",
                           f"{s['macs'] / 1e6:.2f} M ({s['gate_macs'] / 1e3:.1f} k)",
                           f"{t['mean']:.2f} ± {t['std']:.2f} [{t['min']:.2f}, {t['max']:.2f}]",
                           f"{s['train_images_per_s']['mean']:.0f}", f"{s['infer_images_per_s']['mean']:.0f}"])
    table = header + markdown_table(["row", "model", "width", "params", "MACs", "test top-1 %", "train img/s",
                                     "inference img/s"], table_rows)
    table += "\n\n" + "\n".join(f"- {line}" for line in interpret(summaries, args, n_train)) + "\n"

    payload = {"provenance": provenance(["bench/accuracy_study.py", *argv_used]), "settings": vars(args),
               "train_images": n_train, "test_images": len(data.val), "wall_seconds": wall,
               "row2_params": replace_params, "row4_width": narrow_w, "row4_params": narrow_params,
               "width_search": searched, "rows": summaries, "runs": runs}
    stem = os.path.join(args.out, args.stem)
    write_results(stem, payload, table)
    _plot(stem, summaries, args, n_train)
    print(table)
    print(f"\nwrote {stem}.json, .md, .png; wall time {wall / 60:.1f} min")


def interpret(summaries: list[dict[str, Any]], args: argparse.Namespace, n_train: int) -> list[str]:
    """A few plain sentences read off the numbers (computed here, not written by hand)."""
    plain, replace, kdna, narrow = summaries
    m = {i: s["top1"]["mean"] for i, s in enumerate(summaries, 1)}
    noise = max(s["top1"]["std"] for s in summaries)

    def versus(a: int, b: int) -> str:
        diff = m[a] - m[b]
        sa, sb = summaries[a - 1]["top1"], summaries[b - 1]["top1"]
        overlap = sa["min"] <= sb["max"] and sb["min"] <= sa["max"]
        verdict = ("within the seed spread (the ranges over seeds overlap)" if overlap else
                   "outside the seed spread (the ranges over seeds do not overlap)")
        return f"{diff:+.2f} points, {verdict}"

    lines = [
        f"Sharing vs shrinking (row 2 vs row 4, {replace['params']:,} vs {narrow['params']:,} params): "
        f"{versus(2, 4)}. Row 2 costs {replace['macs'] / narrow['macs']:.2f}x row 4's MACs and trains at "
        f"{replace['train_images_per_s']['mean'] / narrow['train_images_per_s']['mean']:.2f}x its speed.",
        f"Replace mode vs the plain model it came from (row 2 vs row 1): {versus(2, 1)}, with "
        f"{100 * (1 - replace['params'] / plain['params']):.0f}% fewer parameters.",
        f"Reference topology vs plain (row 3 vs row 1): {versus(3, 1)}, with "
        f"{100 * (1 - kdna['params'] / plain['params']):.0f}% fewer parameters and "
        f"{100 * (kdna['macs'] / plain['macs'] - 1):+.0f}% MACs; it trains at "
        f"{kdna['train_images_per_s']['mean'] / plain['train_images_per_s']['mean']:.2f}x and infers at "
        f"{kdna['infer_images_per_s']['mean'] / plain['infer_images_per_s']['mean']:.2f}x the plain model's speed.",
        f"Noise: {len(args.seeds)} seeds per row (largest std {noise:.2f} points), {n_train:,} training images and "
        f"{args.epochs} epochs (short training, not converged): differences of a few tenths of a point are not "
        f"evidence, and the ranking may change with longer training or the full training set.",
        f"Speeds were measured with {args.threads} torch thread(s) on a shared {os.cpu_count()}-core CPU while other "
        f"jobs ran; treat them as rough ratios, not absolute figures (runs were interleaved across rows to spread "
        f"the load).",
    ]
    return lines


def _plot(stem: str, summaries: list[dict[str, Any]], args: argparse.Namespace, n_train: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["#555555", "#d95f02", "#1b9e77", "#7570b3"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for s, c in zip(summaries, colors):
        t = s["top1"]
        ax.errorbar(s["params"] / 1e3, t["mean"], yerr=[[t["mean"] - t["min"]], [t["max"] - t["mean"]]],
                    fmt="o", color=c, capsize=4, markersize=7,
                    label=f"{s['row']} ({s['spec']['name']}, w {s['spec']['width']:g})")
    ax.set_xlabel("parameters (thousands)")
    ax.set_ylabel("test top-1 % (mean, bars: min-max over seeds)")
    ax.set_title(f"Fashion-MNIST, {n_train:,} train images, {args.epochs} epochs, {len(args.seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center")
    labels = [s["row"].split(" ")[0] for s in summaries]
    xs = range(len(summaries))
    ax2.bar([x - 0.2 for x in xs], [s["train_images_per_s"]["mean"] for s in summaries], 0.4, color=colors,
            alpha=0.6, label="train")
    ax2.bar([x + 0.2 for x in xs], [s["infer_images_per_s"]["mean"] for s in summaries], 0.4, color=colors,
            hatch="//", label="inference")
    ax2.set_xticks(list(xs), [f"row {lab}" for lab in labels])
    ax2.set_ylabel("images / s (CPU, shared machine)")
    ax2.set_title("throughput: plain = train, hatched = inference", fontsize=9)
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
