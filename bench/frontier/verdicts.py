"""The frontier report's numbers: the per-row summary, the plain-net curve every row is read against, the targets
judged by bench.common's rules, and their text."""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
from typing import Any, Callable

from tqdm import tqdm

from kdna_fx.timing import markdown_table

from bench.common import ABOVE, BELOW, TIE, compare, machine_label, paired, paired_cell
from bench.frontier.queue import record_path, run_dir
from bench.frontier.rows import KERNELDNA, PEERS, Row, cost
from bench.frontier.speed import load_timings

def load_records(out: str) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    root = os.path.join(out, "runs")
    for row_name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for name in sorted(os.listdir(os.path.join(root, row_name))):
            if name.endswith(".json"):
                with open(os.path.join(root, row_name, name)) as f:
                    runs.setdefault(row_name, []).append(json.load(f))
    return runs


def in_progress(args: argparse.Namespace, rows: list[Row]) -> list[str]:
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
    runs = load_records(args.out)
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
            "in_progress": in_progress(args, [Row.of(n) for n in args.rows]),
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


def with_timing(rows: list[dict[str, Any]], timing: dict[str, Any]) -> list[dict[str, Any]]:
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
        timed = with_timing(rows, timing)
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
