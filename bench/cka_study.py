"""CKA study (issue 9): how redundant are a trained CNN's layers, and do CKA-guided families convert better?

    .venv/bin/python -m bench.cka_study                      # the committed study (resumes)
    .venv/bin/python -m bench.cka_study --report             # tables and figures from the runs on disk

On the Fashion-MNIST ResNet-18 (width 0.25) of bench/conversion_study.py (same original, same images):

1. **Heat maps**: ``kdna_fx.cka.layer_similarity`` of every conv of the original, flattened and spatially
   pooled, and of its ``kdna-r4`` conversion after calibration beside the original (the paper's Figures 1
   and 5). ``--cka-images`` test images.
2. **Plans at equal parameters**: families capped at one child (``max_children=1``) so that *who shares with
   whom* is a choice: by position (``kdna-r4-pairs``), by CKA (``kdna-r4-pairs-cka``, ``policy="cka"`` on the
   calibration images), and 3 random plans with the same family sizes (``kdna-r4-pairs-random{1,2,3}``). Each
   row runs through conversion_study's ``run_one``: the same conversion, label-free calibration and 1-epoch
   fine-tune, scored on the 10,000 test images.
3. **Does CKA predict a good stand-in?** For every ordered pair (parent a, child b) of same-shaped convs in a
   stage: the one-family plan {a: [b]} (rank 0, ``init="trained"``), calibrated with ``("bn", "layerwise")``
   (``--layerwise-steps`` Adam steps on that child alone), and the child's relative output error afterwards,
   against CKA(a, b) of the original: a scatter plot and Spearman's rank correlation (scipy).

Every unit of work writes its own JSON (``<out>/parts/``, plan rows under ``<out>/runs/``) and is skipped when present. Writes
``<out>/cka_study.{json,md}`` and ``cka_original.png``, ``cka_original_vs_converted.png``, ``cka_standin.png``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any

import torch

import kdna_fx
from kdna_fx.calibration import CalibrationConfig
from kdna_fx.cka import LayerSimilarity, layer_similarity
from kdna_fx.train import build_data

from bench import conversion_study as cs  # the same originals, images and pipeline
from bench.common import (DirtyTreeError, markdown_table, paired, paired_cell, report_provenance, run_provenance,
                          write_json, write_results)
from bench.conversion_report import by_seed, cell, summarise
from bench.conversion_rows import recipe

ARCH = "resnet18_w025"
PLAN_ROWS = ["kdna-r4-pairs", "kdna-r4-pairs-cka", "kdna-r4-pairs-random1", "kdna-r4-pairs-random2",
             "kdna-r4-pairs-random3"]


def _load(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def calibration_images(n: int, seed: int = 0) -> torch.Tensor:
    """The calibration images conversion_study uses for ``seed`` (drawn outside its validation split)."""
    return cs.Split.make(build_data("fashion-mnist"), 5_000).calibration_images(n, seed)[0]


def heat_maps(args: argparse.Namespace, original: torch.nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    path = os.path.join(args.out, "parts", "heat_maps.json")
    done = _load(path)
    if done is not None:
        return done
    test = build_data("fashion-mnist").val
    images = torch.stack([test[i][0] for i in range(args.cka_images)])
    maps = {pool: layer_similarity(original, images, images=args.cka_images, pool=pool, progress=args.progress)
            for pool in ("flatten", "mean")}
    calib = calibration_images(args.calib_images)
    converting = recipe("kdna-r4", original, spec, calib, CalibrationConfig(steps=args.steps, progress=args.progress),
                        args.all_lr)
    student = converting.convert(original, calib).model
    converted = layer_similarity(student, images, images=args.cka_images, pool="flatten", progress=args.progress)
    result = {"original": {p: m.to_dict() for p, m in maps.items()}, "converted_flatten": converted.to_dict(),
              "provenance": args.provenance}
    write_json(path, result)
    return result


def stand_in(args: argparse.Namespace, original: torch.nn.Module, spec: dict[str, Any],
             similarity: LayerSimilarity) -> list[dict[str, Any]]:
    path = os.path.join(args.out, "parts", "stand_in.json")
    done = _load(path)
    if done is not None:
        return done["pairs"]
    config = kdna_fx.KDNAConfig()
    plan = kdna_fx.plan(original, config)
    calib = calibration_images(args.calib_images)
    pairs = []
    for family in plan.families:
        for a, b in itertools.permutations(family.members, 2):
            one = kdna_fx.Plan((kdna_fx.Family(a, (b,)),))
            with torch.no_grad():
                kmodel = kdna_fx.transform(original, config, plan=one, init="trained")
            report = kdna_fx.calibrate(kmodel, calib, CalibrationConfig(modes=("bn", "layerwise"),
                                                                        layerwise_steps=args.layerwise_steps,
                                                                        progress=False), reference=original)
            before, after = report.modes[-1].children[b]
            pairs.append({"parent": a, "child": b, "cka": similarity[a, b], "error_before": before,
                          "error_after": after, "agreement_after": report.agreement_after})
            print(f"    stand-in {a} -> {b}: CKA {similarity[a, b]:.3f}, error {before:.3f} -> {after:.3f}",
                  flush=True)
    write_json(path, {"pairs": pairs, "layerwise_steps": args.layerwise_steps, "provenance": args.provenance})
    return pairs


def report(args: argparse.Namespace) -> None:
    from scipy.stats import spearmanr

    maps = _load(os.path.join(args.out, "parts", "heat_maps.json"))
    sections = []
    if maps is not None:
        flat = LayerSimilarity.from_dict(maps["original"]["flatten"])
        pooled = LayerSimilarity.from_dict(maps["original"]["mean"])
        converted = LayerSimilarity.from_dict(maps["converted_flatten"])
        flat.label, pooled.label, converted.label = ("original, flattened", "original, mean-pooled",
                                                     "converted kdna-r4 after calibration, flattened")
        flat.plot(os.path.join(args.out, "cka_original.png"), compare=pooled,
                  title="original ResNet-18 w0.25: flattened vs mean-pooled features")
        flat.plot(os.path.join(args.out, "cka_original_vs_converted.png"), compare=converted)
        off = ~torch.eye(len(flat.names), dtype=torch.bool)
        sections.append(markdown_table(
            ["map", "mean off-diagonal CKA", "min", "max"],
            [[name, f"{m.matrix[off].mean():.3f}", f"{m.matrix[off].min():.3f}", f"{m.matrix[off].max():.3f}"]
             for name, m in (("original, flattened", flat), ("original, mean-pooled", pooled),
                             ("converted kdna-r4, flattened", converted))]))
    summary = summarise(args.out)
    rows = sorted((r for r in summary["rows"] if r["row"] in PLAN_ROWS), key=lambda r: PLAN_ROWS.index(r["row"]))
    if rows:
        sections.append(markdown_table(
            ["plan", "params", "seeds", "calibrated: top-1 % / agreement", "fine-tuned"],
            [[f"`{r['row']}`", f"{r['params']:,}", len(r["seeds"]), cell(r, "calibrated"),
              cell(r, "fine-tuned")] for r in rows]))
        sections.append(verdicts_text(plan_verdicts(rows)))
    standin = _load(os.path.join(args.out, "parts", "stand_in.json"))
    result: dict[str, Any] = {"plans": rows, "verdicts": plan_verdicts(rows)}
    if standin is not None:
        pairs = standin["pairs"]
        distinct = distinct_pairs(pairs)
        rho, p_value = spearmanr([p["cka"] for p in distinct], [p["error_after"] for p in distinct])
        result["stand_in"] = {"pairs": pairs, "distinct": distinct, "spearman_rho": float(rho),
                              "p_value": float(p_value)}
        sections.append(f"Stand-in: {len(distinct)} distinct pairs ({len(pairs)} ordered ones, each pair's two "
                        f"directions averaged: CKA is symmetric, so counting both would count each pair twice); "
                        f"Spearman rank correlation between CKA(a, b) and the child's output error after layer-wise "
                        f"calibration: rho = {rho:.2f} (p = {p_value:.2f}).")
        _scatter(pairs, rho, os.path.join(args.out, "cka_standin.png"))
    if maps is not None:
        result["heat_maps"] = maps
    try:  # the report names the commit that wrote it, so only committed code writes it
        prov = report_provenance(os.path.join(args.out, "cka_study"), None, out=args.out, report_only=args.report)
    except DirtyTreeError as exc:
        print(f"(not written: {exc})")
        return
    write_results(os.path.join(args.out, "cka_study"), {**result, "provenance": prov},
                  "\n\n".join(sections) or "no results yet")
    print("\n\n".join(sections))


def distinct_pairs(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per unordered pair {a, b}: its CKA and the mean error after calibration of its two directions."""
    grouped: dict[frozenset[str], list[dict[str, Any]]] = {}
    for p in pairs:
        grouped.setdefault(frozenset((p["parent"], p["child"])), []).append(p)
    return [{"layers": sorted(key), "cka": both[0]["cka"],
             "error_after": sum(p["error_after"] for p in both) / len(both), "directions": len(both)}
            for key, both in grouped.items()]


def plan_verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The CKA plan against each other plan, by bench.common.paired on the test top-1 of the seeds both ran."""
    found = {r["row"]: r for r in rows}
    cka = found.get("kdna-r4-pairs-cka")
    out = []
    for other in (r for r in rows if cka is not None and r is not cka):
        entry: dict[str, Any] = {"row": cka["row"], "baseline": other["row"]}
        for stage in ("calibrated", "fine-tuned"):
            a, b = by_seed(cka, stage), by_seed(other, stage)
            if a and b:
                entry[stage] = paired(a, b)
        out.append(entry)
    return out


def verdicts_text(verdicts: list[dict[str, Any]]) -> str:
    return ("The CKA plan against each other plan, by bench.common.paired (the one rule where arms share seeds: "
            "the mean of the seed-by-seed differences and its 95 % t interval; above or below only when the "
            "interval excludes 0; fewer than 3 pairs are reported, never judged):\n\n"
            + markdown_table(["plan", "against", "after calibration", "after fine-tune"],
                             [[f"`{v['row']}`", f"`{v['baseline']}`", paired_cell(v.get("calibrated")),
                               paired_cell(v.get("fine-tuned"))] for v in verdicts]))


def _scatter(pairs: list[dict[str, Any]], rho: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    stages = sorted({p["child"].split(".")[0] for p in pairs})
    for stage in stages:
        mine = [p for p in pairs if p["child"].startswith(stage + ".")]
        ax.scatter([p["cka"] for p in mine], [p["error_after"] for p in mine], label=stage)
    ax.set_xlabel("linear CKA(parent, child) of the original (flattened)")
    ax.set_ylabel("child's relative output error after layer-wise calibration")
    ax.set_title(f"Does CKA predict a good stand-in? Spearman rho = {rho:.2f}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["maps", "plans", "stand-in"], choices=["maps", "plans", "stand-in"])
    p.add_argument("--rows", nargs="+", default=PLAN_ROWS, choices=PLAN_ROWS, help="plan rows to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--cka-images", type=int, default=512)
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layerwise-steps", type=int, default=50)
    p.add_argument("--all-lr", type=float, default=1e-3)
    p.add_argument("--finetune-images", type=int, default=10_000)
    p.add_argument("--test-images", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/cka")
    p.add_argument("--report", action="store_true")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    args.data, args.val_images, args.force_dirty = None, 5_000, False
    torch.set_num_threads(args.threads)
    if not args.report:
        try:  # read at the start: the commit that runs is the one checked out now
            args.provenance = run_provenance(["-m", "bench.cka_study", *(argv or sys.argv[1:])], out=args.out)
        except DirtyTreeError as exc:
            raise SystemExit(str(exc)) from None
        original, spec, _ = cs.load_original(ARCH)
        if "maps" in args.parts or "stand-in" in args.parts:
            started = time.perf_counter()
            maps = heat_maps(args, original, spec)
            print(f"heat maps: {time.perf_counter() - started:.0f} s", flush=True)
            if "stand-in" in args.parts:
                stand_in(args, original, spec, LayerSimilarity.from_dict(maps["original"]["flatten"]))
        if "plans" in args.parts:
            cs.run_jobs([(ARCH, row, seed) for seed in args.seeds for row in args.rows], args)
    report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
