"""Detection study (issue 7, part 3): Faster R-CNN with a small ResNet-18-FPN, plain vs kdna_fx.transform.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.detection_study --seeds 0 1 2 3   # the committed study
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.detection_study --seeds 4 --rows plain kdna   # one more seed
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.detection_study --report   # tables and figure from every run on disk

Data: bench.scenes.FashionScenes, 128x128 scenes of 1-4 Fashion-MNIST garments; training scenes from
the training images, a fixed set of ``--val`` scenes (seed 0) from the test images.

Model: torchvision's FasterRCNN around a BackboneWithFPN on the zoo's ResNet-18 (``--width``, one input channel,
BatchNorm trained from scratch rather than torchvision's FrozenBatchNorm, which assumes pretrained weights) with
a ``--fpn``-channel FPN, anchors of 16-256 px, a two-layer MLP box head of 256 units, and fewer proposals and
sampled RoIs than torchvision's defaults (sized for 128 px scenes with at most 4 objects, and for a CPU).

Rows: ``plain``; ``kdna`` = ``kdna_fx.transform(plain, KDNAConfig(stage_depth=3))`` (the detector's own forward
does not trace, so its convs are shared by module swap: families inside each ResNet stage of the body and across
the FPN's output convs; the RPN and RoI heads hold no family);
``plain-narrow``, the plain detector at the ResNet-18 width that gives it the kdna row's parameter count (does
sharing beat simply building a smaller network?). Every row gets the same recipe: ``--steps`` AdamW steps of
``--batch`` scenes (kdna_fx.train's param_groups, build_optimizer and WarmupCosine), the same seeded scene order,
one torch thread.

Scored with pycocotools: box mAP@[.5:.95] and mAP@.5 on the val scenes. Per row also parameters, MACs (one val
scene, kdna_fx.reporting.count_macs) and eval latency at batch 1 (kdna_fx.timing.time_interleaved: the rows of a
seed and the kdna row folded with kdna_fx.fold, interleaved in one process). Each (row, seed) writes
``<out>/runs/<row>/seed<N>.json`` when done and is skipped when present; its weights go to ``--ckpt-dir``
(scratch) for the latency. ``<out>/detection_study.{json,md}`` and ``<out>/predictions.png`` are written at the
end.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import kdna_fx
from kdna_fx.models import create_model
from kdna_fx.reporting import count_macs
from kdna_fx.timing import markdown_table, time_interleaved, write_results
from kdna_fx.utils import write_json
from kdna_fx.train import WarmupCosine, build_optimizer, param_groups
from kdna_fx.train.recipe import seed_everything

from bench.common import DirtyTreeError, report_provenance, run_provenance
from bench.scenes import SCENE_CLASSES, FashionScenes, collate

ROWS = ("plain", "kdna", "plain-narrow")
EXAMPLES = 4  # val scenes whose predictions are kept for the figure


# ------------------------------------------------------------------------------------------------ the model

def build(row: str, args: argparse.Namespace, seed: int) -> nn.Module:
    """The detector of ``row``, freshly initialised from ``seed`` (plain and kdna start from the same weights)."""
    if row not in ROWS:
        raise SystemExit(f"unknown row {row!r}; choose from {', '.join(ROWS)}")
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    torch.manual_seed(seed)
    width = narrow_width(args) if row == "plain-narrow" else args.width
    body = create_model("resnet18", in_chans=1, width=width)
    stages = [f"layer{i}" for i in range(1, 5)]
    channels = [getattr(body, s)[-1].bn2.num_features for s in stages]
    backbone = BackboneWithFPN(body, {s: str(i) for i, s in enumerate(stages)}, channels, args.fpn,
                               extra_blocks=LastLevelMaxPool())
    model = FasterRCNN(
        backbone, min_size=args.size, max_size=args.size,  # the scenes' own size: no resizing
        image_mean=[0.0], image_std=[1.0],  # scenes are already in [0, 1]; the stem's BatchNorm does the rest
        rpn_anchor_generator=AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5),
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        # RoIAlign's backward dominates a CPU step: 64 sampled RoIs per scene instead of 512.
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), box_batch_size_per_image=64,
        box_head=TwoMLPHead(args.fpn * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, len(SCENE_CLASSES)))
    if row == "kdna":
        # stage_depth=3: stages inside the backbone (backbone.body.layer1, backbone.fpn.layer_blocks), the
        # families the study ran with (then counted from the rewritten backbone by partial tracing).
        return kdna_fx.transform(model, kdna_fx.KDNAConfig(stage_depth=3), inplace=True)
    return model


@functools.lru_cache(maxsize=None)
def _narrow_width(width: float, fpn: int, size: int) -> float:
    def params(row: str, w: float) -> int:
        return n_params(build(row, argparse.Namespace(width=w, fpn=fpn, size=size), 0))

    target = params("kdna", width)
    lo, hi = 0.05, width  # parameters grow with the width: bisect for the kdna row's count
    for _ in range(20):
        mid = (lo + hi) / 2
        if params("plain", mid) < target:
            lo = mid
        else:
            hi = mid
    return round(hi, 4)


def narrow_width(args: argparse.Namespace) -> float:
    """The ResNet-18 width at which the plain detector has the kdna row's parameter count (the control that
    asks whether sharing beats simply building a smaller network)."""
    return _narrow_width(args.width, args.fpn, args.size)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists a shared kernel once


# ------------------------------------------------------------------------------------------------ scoring

def coco_map(predictions: dict[int, dict[str, torch.Tensor]], scenes: FashionScenes) -> dict[str, float]:
    """pycocotools box mAP@[.5:.95] and mAP@.5 of ``predictions`` (image_id -> torchvision output)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for i in range(len(scenes)):
        _, target = scenes[i]
        image_id = int(target["image_id"])
        images.append({"id": image_id, "width": scenes.size, "height": scenes.size})
        for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"]):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": _xywh(box), "area": int(mask.sum()), "iscrowd": 0})
        out = predictions[image_id]
        for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()):
            detections.append({"image_id": image_id, "category_id": label, "bbox": _xywh(box), "score": score})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": i, "name": n} for i, n in enumerate(SCENE_CLASSES) if i]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        if not detections:
            return {"map": 0.0, "map50": 0.0}
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map": float(evaluator.stats[0]), "map50": float(evaluator.stats[1])}


def _xywh(box: list[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1, y1, x2 - x1, y2 - y1]


@torch.inference_mode()
def predict(model: nn.Module, scenes: FashionScenes, batch: int) -> dict[int, dict[str, torch.Tensor]]:
    model.eval()
    out: dict[int, dict[str, torch.Tensor]] = {}
    for images, targets in DataLoader(scenes, batch_size=batch, collate_fn=collate):
        for target, pred in zip(targets, model(images)):
            out[int(target["image_id"])] = pred
    return out


# ------------------------------------------------------------------------------------------------ one run

def val_scenes(args: argparse.Namespace) -> FashionScenes:
    return FashionScenes("val", size=args.size, length=args.val, seed=0)


def ckpt_path(args: argparse.Namespace, row: str, seed: int) -> str:
    return os.path.join(args.ckpt_dir, f"{row}_seed{seed}.pt")


def run_one(row: str, seed: int, args: argparse.Namespace, path: str) -> None:
    seed_everything(seed)
    model = build(row, args, seed)
    groups = param_groups(model, args.weight_decay)
    optimizer = build_optimizer(groups, "adamw", args.lr)
    schedule = WarmupCosine(optimizer, args.steps, args.warmup)
    train = FashionScenes("train", size=args.size, seed=seed)
    order = torch.Generator().manual_seed(seed)  # the same scene order for both rows of a seed
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, generator=order, collate_fn=collate,
                        drop_last=True)
    model.train()
    losses: list[dict[str, float]] = []
    window: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=args.steps, desc=f"{row} seed {seed}", unit="step", mininterval=10)
    for step, (images, targets) in enumerate(loader):
        if step == args.steps:
            break
        loss_parts = model(images, targets)
        loss = sum(loss_parts.values())
        if not torch.isfinite(loss):
            raise SystemExit(f"{row} seed {seed}: non-finite loss at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # early RPN losses spike on a random backbone
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{statistics.mean(window[-20:]):.3f}", refresh=False)
        if (step + 1) % 50 == 0:
            losses.append({"step": step + 1, "loss": statistics.mean(window)})
            window = []
    bar.close()
    train_s = time.perf_counter() - start
    val = val_scenes(args)
    start = time.perf_counter()
    predictions = predict(model, val, args.batch)
    metrics = coco_map(predictions, val)
    eval_s = time.perf_counter() - start
    macs, gate_macs = count_macs(model, [val[0][0]])
    os.makedirs(args.ckpt_dir, exist_ok=True)
    torch.save(model.state_dict(), ckpt_path(args, row, seed))
    examples = {str(i): {k: v.tolist() for k, v in predictions[i].items()} for i in range(EXAMPLES)}
    write_json(path, {
        "row": row, "seed": seed, "width": narrow_width(args) if row == "plain-narrow" else args.width, **metrics,
        "params": n_params(model), "macs": macs, "gate_macs": gate_macs,
        "train_s": train_s, "eval_s": eval_s, "steps": args.steps, "batch": args.batch, "losses": losses,
        "examples": examples, "recipe": recipe(args), "provenance": args.provenance})
    print(f"{row} seed {seed}: mAP {metrics['map']:.4f}, mAP@.5 {metrics['map50']:.4f}, "
          f"train {train_s / 60:.1f} min", flush=True)


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("size", "width", "fpn", "steps", "batch", "lr", "weight_decay",
                                          "warmup", "val")}


def speed(seed: int, args: argparse.Namespace, path: str) -> None:
    """Eval latency at batch 1 of both trained rows of ``seed`` and of the kdna row folded for deployment
    (kdna_fx.fold), interleaved, on val scene 0."""
    models = {}
    for row in (r for r in ROWS if os.path.exists(ckpt_path(args, r, seed))):
        model = build(row, args, seed)
        model.load_state_dict(torch.load(ckpt_path(args, row, seed), weights_only=True))
        models[row] = model.eval()
    models["kdna-folded"] = kdna_fx.fold(models["kdna"])
    image = [val_scenes(args)[0][0]]
    with torch.inference_mode():  # folding must not change what the model predicts
        unfolded, folded = models["kdna"](image)[0], models["kdna-folded"](image)[0]
    diff = (unfolded["boxes"] - folded["boxes"]).abs() if unfolded["boxes"].shape == folded["boxes"].shape else None
    fold_diff = None if diff is None else float(diff.max()) if diff.numel() else 0.0
    timed = time_interleaved({row: (lambda m=m: m(image)) for row, m in models.items()},
                             warmup=5, repeat=args.repeat, rounds=5)
    write_json(path, {"seed": seed, "batch": 1, "latency": timed, "fold_max_box_diff": fold_diff,
                     "provenance": args.provenance})


# ------------------------------------------------------------------------------------------------ report

def summarise(out: str) -> dict[str, Any]:
    """Every run on disk, per row: its records, and mean and spread over its seeds."""
    import json

    rows: dict[str, Any] = {}
    seeds = sorted({int(name[4:-5]) for row in ROWS if os.path.isdir(os.path.join(out, "runs", row))
                    for name in os.listdir(os.path.join(out, "runs", row)) if name.endswith(".json")})
    for row in ROWS:
        runs = []
        for seed in seeds:
            path = os.path.join(out, "runs", row, f"seed{seed}.json")
            if os.path.exists(path):
                with open(path) as f:
                    runs.append(json.load(f))
        if runs:
            rows[row] = {"runs": runs, "seeds": [r["seed"] for r in runs]}
            for key in ("map", "map50", "train_s"):
                values = [r[key] for r in runs]
                rows[row][key] = {"mean": statistics.mean(values),
                                  "std": statistics.stdev(values) if len(values) > 1 else 0.0}
            for key in ("params", "macs", "gate_macs"):
                rows[row][key] = runs[0][key]
            rows[row]["width"] = runs[0].get("width", runs[0]["recipe"]["width"])
    speeds = []
    for seed in seeds:
        path = os.path.join(out, "runs", f"speed_seed{seed}.json")
        if os.path.exists(path):
            with open(path) as f:
                speeds.append(json.load(f))
    for row in rows:
        for form in (row, f"{row}-folded"):
            timed = [s["latency"][form] for s in speeds if form in s["latency"]]
            if timed:
                rows[row][f"latency_ms{form[len(row):]}"] = [1000 * t["median_s"] for t in timed]
                rows[row][f"latency_iqr_rel{form[len(row):]}"] = [t["iqr_rel"] for t in timed]
    return rows


def _pm(stat: dict[str, float], n: int, scale: float = 100.0) -> str:
    return f"{scale * stat['mean']:.2f}" + (f" ± {scale * stat['std']:.2f}" if n > 1 else "")


def _latency(r: dict[str, Any], form: str) -> str:
    if not r.get(f"latency_ms{form}"):
        return "-"
    return (" / ".join(f"{ms:.1f}" for ms in r[f"latency_ms{form}"])
            + " (IQR " + " / ".join(f"{100 * q:.0f}%" for q in r[f"latency_iqr_rel{form}"]) + ")")


def table(rows: dict[str, Any]) -> str:
    base = rows.get("plain")
    body = []
    for row, r in rows.items():
        n = len(r["seeds"])
        change = (f" ({100 * (r['params'] - base['params']) / base['params']:+.1f}%)"
                  if base and row != "plain" else "")
        latency = _latency(r, "") + (f"; folded {_latency(r, '-folded')}" if "latency_ms-folded" in r else "")
        body.append([row, f"{r['width']:g}", ", ".join(map(str, r["seeds"])), f"{r['params']:,}{change}",
                     f"{r['macs'] / 1e6:.1f} M",
                     _pm(r["map"], n), _pm(r["map50"], n), latency, f"{r['train_s']['mean'] / 60:.1f}"])
    return markdown_table(["row", "ResNet-18 width", "seeds", "parameters", "MACs", "box mAP@[.5:.95] (%)",
                           "box mAP@.5 (%)",
                           "latency, batch 1 (ms, median per seed; IQR)", "train (min)"], body)


def figure(rows: dict[str, Any], args: argparse.Namespace, path: str) -> None:
    """Predicted boxes (score >= 0.5) over the ground truth on the first val scenes, one row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    val = val_scenes(args)
    fig, axes = plt.subplots(len(rows), EXAMPLES, figsize=(3.2 * EXAMPLES, 3.6 * len(rows)), squeeze=False,
                             layout="constrained")
    for ax_row, (row, r) in zip(axes, rows.items()):
        run = r["runs"][0]
        for i, ax in enumerate(ax_row):
            image, target = val[i]
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
            for x1, y1, x2, y2 in target["boxes"].tolist():
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1, ls="--"))
            pred = run["examples"][str(i)]
            for (x1, y1, x2, y2), label, score in zip(pred["boxes"], pred["labels"], pred["scores"]):
                if score < 0.5:
                    continue
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="red", lw=1.2))
                ax.text(x1, y1 - 1, f"{SCENE_CLASSES[label]} {score:.2f}", color="red", fontsize=6)
            truth = ", ".join(SCENE_CLASSES[int(t)] for t in target["labels"])
            ax.set_title(f"{row} (seed {run['seed']})\ntruth: {truth}", fontsize=7)
            ax.axis("off")
    fig.suptitle("Faster R-CNN, ResNet-18-FPN: predictions (red, score >= 0.5) and ground truth (green, dashed)",
                 fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args: argparse.Namespace) -> None:
    rows = summarise(args.out)
    if not rows:
        print("no runs to report yet")
        return
    text = table(rows)
    try:  # a run's report names the commit that ran (committed code only); --report keeps the stored one
        prov = report_provenance(os.path.join(args.out, "detection_study"), ["-m", "bench.detection_study", *args.argv],
                                 out=args.out, report_only=args.report)
    except DirtyTreeError as exc:
        print(f"(not written: {exc})")
        return
    write_results(os.path.join(args.out, "detection_study"),
                  {"rows": rows, "recipe": recipe(args), "provenance": prov}, text)
    figure(rows, args, os.path.join(args.out, "predictions.png"))
    print(text)


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--steps", type=int, default=400, help="training steps per row")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    parser.add_argument("--size", type=int, default=128, help="scene size (pixels)")
    parser.add_argument("--width", type=float, default=0.5, help="ResNet-18 channel multiplier")
    parser.add_argument("--fpn", type=int, default=64, help="FPN channels")
    parser.add_argument("--val", type=int, default=500, help="val scenes (fixed, seed 0)")
    parser.add_argument("--repeat", type=int, default=10, help="latency samples per row per round (5 rounds)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/detection")
    parser.add_argument("--ckpt-dir", default="logs/detection", help="trained weights (scratch, not committed)")
    parser.add_argument("--report", action="store_true", help="only write the tables and figure")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    torch.set_num_threads(args.threads)
    if not args.report:
        try:  # read once, at the start: the commit that runs
            args.provenance = run_provenance(["-m", "bench.detection_study", *args.argv], out=args.out)
        except DirtyTreeError as exc:
            raise SystemExit(str(exc)) from None
        for seed in args.seeds:
            for row in args.rows:
                path = os.path.join(args.out, "runs", row, f"seed{seed}.json")
                if os.path.exists(path):
                    print(f"skip {row} seed {seed}: {path} exists", flush=True)
                    continue
                run_one(row, seed, args, path)
            path = os.path.join(args.out, "runs", f"speed_seed{seed}.json")
            if not os.path.exists(path) and all(os.path.exists(ckpt_path(args, r, seed)) for r in ("plain", "kdna")):
                speed(seed, args, path)
    report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
