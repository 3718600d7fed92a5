"""The conversion study's report: per (arch, row) the stages' top-1 over the seeds, the verdicts of
bench.common.paired on the HEADLINE pairs, the validation grid's winners, tables and the plot. Reads the records
of bench.conversion_study (any protocol) by their row names, keys into bench.conversion_rows.ROWS."""
from __future__ import annotations

import json
import os
import statistics
from typing import Any

from bench.common import (DirtyTreeError, machine_label, markdown_table, paired, paired_cell, report_provenance,
                          write_results)
from bench.conversion_rows import (ABLATION, GRID, HEADLINE, ORIGINALS, STAGES, STUDY_ROWS, arm, extra, method,
                                   probe_name)


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
    order = STUDY_ROWS + ABLATION
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
    """Each HEADLINE pair present (any probes of the two arms, the same EXTRAS on both), judged by bench.common.paired on
    the test top-1 of the seeds both ran (a seed's rows share images and order), after calibration and after
    the fine-tune."""
    out = []
    for mine, other in HEADLINE:
        for a in (r for r in rows if arm(r["row"]) == mine):
            for b in (r for r in rows if arm(r["row"]) == other and r["arch"] == a["arch"]
                      and extra(r["row"]) == extra(a["row"])):  # the loss-form control pairs like with like
                entry: dict[str, Any] = {"arch": a["arch"], "row": a["row"], "baseline": b["row"]}
                for stage in ("calibrated", "fine-tuned"):
                    if by_seed(a, stage) and by_seed(b, stage):
                        entry[stage] = paired(by_seed(a, stage), by_seed(b, stage))
                out.append(entry)
    return sorted(out, key=lambda v: v["arch"])


def winners(summary: dict[str, Any], arch: str, seeds: list[int]) -> dict[str, str]:
    """{arm: the probe text with the best mean validation top-1 after calibration over ``seeds``}; refuses a
    grid with runs missing."""
    found = {r["row"]: r for r in summary["rows"] if r["arch"] == arch}
    best = {}
    for name, probes in GRID.items():
        scores = {}
        for probe in probes:
            r = found.get(probe_name(name, probe))
            if r is None or sorted(by_seed(r, "calibrated", "validation")) != sorted(seeds):
                raise SystemExit(f"the validation grid lacks {probe_name(name, probe)} on seeds {seeds}: run "
                                 f"--plan grid first")
            scores[probe] = statistics.mean(by_seed(r, "calibrated", "validation").values())
        best[name] = max(scores, key=scores.get)  # type: ignore[arg-type]
    return best


def grid_text(summary: dict[str, Any]) -> str:
    """Each arm's probes by mean validation top-1 after calibration, the winner first."""
    lines = []
    for name, probes in GRID.items():
        named = {probe_name(name, probe): probe for probe in probes}
        rows = [(named[r["row"]], r) for r in summary["rows"] if r["row"] in named]  # ties keep the summary's order
        rows.sort(key=lambda pr: -pr[1]["calibrated"]["validation"]["top1_mean"] if "calibrated" in pr[1] else 0)
        lines += [[f"`{name}`", f"`{probe or 'as in protocol 2'}`", len(r["seeds"]),
                   cell(r, "calibrated", "validation"), cell(r, "calibrated")] for probe, r in rows]
    return ("Validation grid: the same number of probes per arm, chosen on the validation split (the test column is "
            "reported, never used)\n\n" + markdown_table(["arm", "probe", "seeds", "calibrated, validation top-1 % / "
                                                          "agreement", "calibrated, test"], lines))


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
                color, marker = style.get(method(r["row"]), ("tab:purple", "D"))
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


def report(out: str, argv: list[str] | None = None, *, report_only: bool = False) -> None:
    """conversion_study.{json,md,png} under ``out`` from the records; ``report_only`` keeps the summary's stored
    provenance (bench.common.report_provenance)."""
    summary = summarise(out)
    if not summary["rows"]:
        print(f"no runs under {out}/runs yet")
        return
    archs = sorted({r["arch"] for r in summary["rows"]})
    md = "\n\n".join(f"### {a}\n\nOriginal: {original_text(summary, a)}\n\n{table(summary, a)}" for a in archs)
    machines = sorted({m for r in summary["rows"] for m in r["machines"]})
    md += "\n\n" + (grid_text(summary) if is_grid(summary) else verdicts_text(summary))
    protocols = ", ".join(str(p) for p in sorted({r["protocol"] for r in summary["rows"]}))
    md += (f"\n\nRuns on: {', '.join(machines)}. Protocol {protocols} (the study's "
           f"README says what each one changed). Latency and throughput: the interleaved `--speed` timing where one "
           f"exists (speed_<arch>.json), else the in-run reading.")
    print(md)
    try:  # the report names the commit that wrote it, so only committed code writes it
        prov = report_provenance(os.path.join(out, "conversion_study"), argv, out=out, report_only=report_only)
    except DirtyTreeError as exc:
        print(f"\n(not written: {exc})")
        return
    write_results(os.path.join(out, "conversion_study"), {**summary, "provenance": prov}, md)
    plot(summary, os.path.join(out, "conversion_study.png"))


def is_grid(summary: dict[str, Any]) -> bool:
    """True for a validation grid: calibration only, no row fine-tuned. A grid chooses between probes and judges
    nothing; the headline and the loss-form control (fine-tuned) are judged."""
    return bool(summary["rows"]) and not any("fine-tuned" in r for r in summary["rows"])


def original_text(summary: dict[str, Any], arch: str) -> str:
    """The original the rows distil from: its sha256 and test top-1 (protocol 3), else the study's README."""
    frozen = {(r["original"] or {}).get("sha256") for r in summary["rows"] if r["arch"] == arch}
    if None in frozen or len(frozen) != 1:
        return "trained as the study's README says for this protocol (no hash in the records)"
    info = next(r["original"] for r in summary["rows"] if r["arch"] == arch)
    return (f"`{ORIGINALS[arch]}` ({info['test_top1']:.2f} % on the test images), frozen in "
            f"originals/{arch}.pt, sha256 `{info['sha256'][:16]}...` in every record")
