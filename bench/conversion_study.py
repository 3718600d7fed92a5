"""Conversion study (issue 6): KernelDNA conversion of a trained CNN against pruning and low-rank factorisation.

    .venv/bin/python bench/conversion_study.py                       # the committed study (resumes)
    .venv/bin/python bench/conversion_study.py --arch resnet18_w025 --seeds 0 --rows kdna-r4 prune@kdna-r4
    .venv/bin/python bench/conversion_study.py --report              # tables and plot from the runs on disk

The originals are trained once with `kdna train` (commands in ``ORIGINALS``, at least 5 epochs on the 60k
Fashion-MNIST training images). Every row then starts from the same trained weights and gets the same budget:

1. **convert**: the method's own label-free step:
   - ``kdna-r{R}``: ``kdna_fx.transform(original, sharing_config with AdapterConfig(rank=R), init="trained")``;
     ``-centroid`` adds ``KDNAConfig(parent="centroid")``; ``kdna-copy-r0`` uses ``init="copy"`` (the paper's
     from-scratch init) as a control. Ablations (first seed only): ``-adapters`` distils adapters and norms
     only (``train="adapters"``), ``-logits`` drops the per-layer loss (``features=0``).
   - ``prune@ROW``: Torch-Pruning (``MetaPruner``, L2 magnitude importance, the same ratio in every layer, the
     classifier kept) at the ratio whose parameter count is closest to ROW's.
   - ``svd@ROW``: every conv that KernelDNA shares in that architecture becomes a k x k conv to R_i channels and
     a 1x1 conv back (truncated SVD of the kernel viewed as [C_out, C_in k k]), R_i = the same fraction of each
     conv's full rank, the fraction chosen to match ROW's parameter count.
   - ``prune{P}+kdna-r{R}``: prune at ratio P/100 first, then convert as ``kdna-r{R}`` (fewer MACs too).
   - ``original``: unchanged (the fine-tune control).
2. **calibrate**: ``kdna_fx.calibrate(model, images, reference=original, modes=("bn", "distill"))`` on the same
   ``--calib-images`` unlabeled training images and ``--steps`` Adam steps for every row, with calibrate's
   default loss: KL to the original's logits plus the normalised MSE of every norm layer's output that has the
   same path and shape in both models (``features=1``). KernelDNA rows use calibrate's defaults (adapters and
   norms at lr 1e-2, the shared kernels at 1e-3: ``train="parents"``); pruned and factorised students have no
   adapters and train every parameter at ``--all-lr`` (``train="all"``). A factorised student keeps every
   layer's output shape, so it gets the per-layer loss too; a pruned one has narrower layers and gets the
   logits loss only.
3. **fine-tune**: one epoch on ``--finetune-images`` labelled training images (SGD, lr 0.01, cosine, batch 128,
   kdna_fx.train.train), the same for every row, the original included.

Each stage is scored on the 10,000 test images: top-1 and agreement with the original. Per row also: parameters,
MACs (one 1x28x28 image), and eager CPU latency at batch 1 and throughput at batch 32 of the deployable form
(KernelDNA rows folded with ``kdna_fx.fold``). Each (arch, row, seed) is one JSON file under
``<out>/runs/``; present files are skipped, so the study resumes. ``--report`` (also run at the end) writes
``<out>/conversion_study.{json,md,png}``.
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
import tempfile
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import kdna_fx
from kdna_fx.models import sharing_config
from kdna_fx.reporting import count_macs
from kdna_fx.timing import markdown_table, provenance, time_call, write_results
from kdna_fx.train import TrainConfig, build_data, train
from kdna_fx.train.checkpoint import CHECKPOINT_NAME, read_checkpoint
from kdna_fx.train.models import build_model

ORIGINALS = {
    "resnet18_w025": "kdna train --model resnet18 --width 0.25 --epochs 5 --batch-size 128 --lr 0.1 "
                     "--warmup-epochs 0.25 --run-dir runs/conversion_original_resnet18_w025 --no-progress",
    "mobilenet_v2_w050": "kdna train --model mobilenet_v2 --width 0.5 --epochs 5 --batch-size 128 --lr 0.1 "
                         "--warmup-epochs 0.25 --run-dir runs/conversion_original_mobilenet_v2_w050 --no-progress",
}
ROWS = ["original", "kdna-r4", "prune@kdna-r4", "svd@kdna-r4", "kdna-r0", "prune@kdna-r0", "svd@kdna-r0",
        "kdna-r8", "prune@kdna-r8", "svd@kdna-r8", "kdna-r4-centroid", "kdna-copy-r0", "prune30+kdna-r4",
        "prune@prune30+kdna-r4"]
# Which calibration steps matter: the same conversion with parts of the recipe switched off (first seed only).
ABLATION = ["kdna-r4-adapters-logits", "kdna-r4-logits", "kdna-r4-adapters"]
STAGES = ("converted", "calibrated", "fine-tuned")


# ------------------------------------------------------------------------------------------------ building


def run_dir(arch: str) -> str:
    return re.search(r"--run-dir (\S+)", ORIGINALS[arch]).group(1)  # type: ignore[union-attr]


def load_original(arch: str) -> tuple[nn.Module, dict[str, Any]]:
    path = os.path.join(run_dir(arch), CHECKPOINT_NAME)
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: train the original first with\n  .venv/bin/{ORIGINALS[arch]}")
    ckpt = read_checkpoint(path)
    spec = ckpt["config"]["model"]
    model = build_model(spec)
    model.load_state_dict(ckpt["model"])
    return model.eval(), spec


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def kdna_config(spec: dict[str, Any], row: str) -> tuple[kdna_fx.KDNAConfig, str, dict[str, Any], int | None]:
    """(config, init, calibrate options, random-plan seed) of a ``kdna-...`` row; no flag: calibrate's defaults.

    Plan flags (the CKA study's rows): ``-pairs`` caps families at one child (``max_children=1``), ``-cka``
    groups by measured similarity (``policy="cka"``), ``-random{K}`` shuffles the members of each shape group
    into families of the same sizes with seed K.
    """
    m = re.fullmatch(r"kdna(-copy)?-r(\d+)((?:-centroid|-adapters|-all|-logits|-pairs|-cka|-random\d+)*)", row)
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


def kdna_convert(model: nn.Module, spec: dict[str, Any], row: str,
                 calib: torch.Tensor | None = None) -> tuple[nn.Module, dict[str, Any]]:
    config, init, options, shuffle = kdna_config(spec, row)
    with torch.no_grad():
        if shuffle is not None:
            return kdna_fx.transform(model, config, plan=random_plan(kdna_fx.plan(model, config), shuffle),
                                     init=init), options
        return kdna_fx.transform(model, config, init=init, data=calib if config.policy == "cka" else None), options


def classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def prune(model: nn.Module, ratio: float) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    if ratio > 0:
        pruner = tp.pruner.MetaPruner(model, torch.randn(2, 1, 28, 28), importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[classifier(model)])
        pruner.step()
    return model


class Factorised(nn.Sequential):
    """A k x k conv to ``rank`` channels, then a 1x1 conv back: the truncated SVD of one conv."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                          bias=False, padding_mode=conv.padding_mode)
        second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
        u, s, vh = torch.linalg.svd(conv.weight.detach().flatten(1).double(), full_matrices=False)
        root = s[:rank].sqrt()
        with torch.no_grad():
            first.weight.copy_((root[:, None] * vh[:rank]).reshape(first.weight.shape))
            second.weight.copy_((u[:, :rank] * root).reshape(second.weight.shape))
            if conv.bias is not None:
                second.bias.copy_(conv.bias)
        super().__init__(first, second)


def shared_convs(model: nn.Module, spec: dict[str, Any]) -> list[str]:
    """The convs KernelDNA shares in this architecture (every family member): what SVD factorises."""
    plan = kdna_fx.plan(model, sharing_config(spec["name"]))
    return [name for family in plan.families for name in family.members]


def factorise(model: nn.Module, names: list[str], fraction: float) -> nn.Module:
    model = copy.deepcopy(model)
    for name in names:
        conv = model.get_submodule(name)
        if conv.groups != 1:
            continue
        full = min(conv.out_channels, conv.weight[0].numel())
        rank = max(1, round(fraction * full))
        if rank * (conv.weight[0].numel() + conv.out_channels) < conv.weight.numel():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, Factorised(conv, rank))
    return model


def matched(build: Callable[[float], nn.Module], target: int, lo: float, hi: float) -> tuple[nn.Module, float]:
    """The knob in [lo, hi] (parameters fall as it rises for pruning, rise for SVD) closest to ``target``."""
    f_lo, f_hi = n_params(build(lo)), n_params(build(hi))
    increasing = f_hi > f_lo
    for _ in range(20):
        mid = (lo + hi) / 2
        above = n_params(build(mid)) > target
        if above == increasing:
            hi = mid
        else:
            lo = mid
    best = min((lo, hi), key=lambda k: abs(n_params(build(k)) - target))
    return build(best), best


def make_student(row: str, original: nn.Module, spec: dict[str, Any], all_lr: float,
                 calib: torch.Tensor | None = None) -> tuple[nn.Module, dict[str, Any] | None, dict[str, Any]]:
    """(student, calibrate options or None for no calibration, how it was made) for one row."""
    if row == "original":
        return copy.deepcopy(original), None, {}
    if row.startswith("kdna"):
        student, options = kdna_convert(original, spec, row, calib)
        made = {"plan": kdna_fx.plan_of(student).to_dict()["families"]} if re.search(r"-(pairs|cka|random)", row) else {}
        return student, options, made
    everything = {"train": "all", "lr": all_lr, "weight_lr": all_lr}  # no adapters: every weight, one rate
    m = re.fullmatch(r"(prune|svd)@(.+)", row)
    if m:
        target = n_params(make_student(m.group(2), original, spec, all_lr, calib)[0])
        if m.group(1) == "prune":
            student, knob = matched(lambda r: prune(original, r), target, 0.0, 0.9)
            return student, everything, {"pruning_ratio": knob, "matched_to": m.group(2), "target_params": target}
        names = shared_convs(original, spec)
        student, knob = matched(lambda f: factorise(original, names, f), target, 0.02, 1.0)
        return student, everything, {"rank_fraction": knob, "matched_to": m.group(2), "target_params": target,
                                     "factorised": names}
    m = re.fullmatch(r"prune(\d+)\+(kdna-.+)", row)
    if m:
        ratio = int(m.group(1)) / 100
        student, options = kdna_convert(prune(original, ratio), spec, m.group(2), calib)
        return student, options, {"pruning_ratio": ratio}
    raise SystemExit(f"unknown row {row!r}; rows look like {ROWS}")


# ------------------------------------------------------------------------------------------------ measuring


@torch.no_grad()
def score(model: nn.Module, original: nn.Module, loader: DataLoader) -> dict[str, float]:
    model.eval()
    correct = agree = count = 0
    for x, y in loader:
        out = model(x).argmax(1)
        correct += int((out == y).sum())
        agree += int((out == original(x).argmax(1)).sum())
        count += len(y)
    return {"top1": 100.0 * correct / count, "agreement": agree / count}


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


def save_json(path: str, payload: dict[str, Any]) -> None:
    """Write whole, then rename: a stopped study never leaves a half-written record to be skipped later."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(f"{path}.tmp", path)


def calibration_images(data: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first ``n`` training images of the seeded order, un-augmented; the order itself): the fine-tune
    takes its labelled images from the rest of the order, so the two never overlap."""
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    plain = copy.copy(data.train)
    plain.augment = False  # calibration sees the images as they are; the fine-tune augments as training did
    return torch.stack([plain[i][0] for i in order[:n].tolist()]), order


def run_one(arch: str, row: str, seed: int, args: argparse.Namespace, path: str) -> None:
    torch.manual_seed(seed)
    original, spec = load_original(arch)
    data = build_data("fashion-mnist", args.data)
    test_set = data.val if not args.test_images else Subset(data.val, range(args.test_images))
    test = DataLoader(test_set, batch_size=500)
    calib, order = calibration_images(data, args.calib_images, seed)
    labelled = Subset(data.train, order[args.calib_images:args.calib_images + args.finetune_images].tolist())

    record: dict[str, Any] = {"arch": arch, "row": row, "seed": seed, "stages": {}}
    start = time.perf_counter()
    student, options, made = make_student(row, original, spec, args.all_lr, calib)
    record.update(made=made, calibrate_options=options, params_original=n_params(original))
    record["stages"]["converted"] = {**score(student, original, test), "seconds": time.perf_counter() - start}

    start = time.perf_counter()
    if options is not None:
        report = kdna_fx.calibrate(student, calib, reference=original, steps=args.steps, seed=seed,
                                   progress=args.progress, **options)
        record["calibration"] = report.to_dict()
    record["stages"]["calibrated"] = {**score(student, original, test), "seconds": time.perf_counter() - start}
    record["cost"] = cost(student)

    start = time.perf_counter()
    config = TrainConfig(epochs=1, batch_size=128, lr=0.01, warmup_epochs=0, seed=seed, amp="none",
                         progress=args.progress, log_every=10_000)
    with tempfile.TemporaryDirectory(prefix="conversion_study_") as tmp:
        train(student, labelled, None, config, tmp)
    record["stages"]["fine-tuned"] = {**score(student, original, test), "seconds": time.perf_counter() - start}
    record["provenance"] = provenance()
    save_json(path, record)


# ------------------------------------------------------------------------------------------------ report


def speed(args: argparse.Namespace) -> None:
    """Re-time the deployable form of every row on disk, rows interleaved in one process (weights do not
    change the time: each row is rebuilt uncalibrated), median over ``--speed-rounds`` rounds."""
    summary = summarise(args.out)
    for arch in sorted({r["arch"] for r in summary["rows"]}):
        original, spec = load_original(arch)
        calib = torch.randn(64, 1, 28, 28)  # only for policy="cka" rows: which convs pair up, not the time
        models = {r["row"]: deployable(make_student(r["row"], original, spec, args.all_lr, calib)[0])
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
        with open(os.path.join(args.out, f"speed_{arch}.json"), "w") as f:
            json.dump({"rows": result, "rounds": args.speed_rounds, "threads": torch.get_num_threads(),
                       "provenance": provenance()}, f, indent=2)
        print(f"{arch}: timed {len(models)} rows")


def summarise(out: str) -> dict[str, Any]:
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for root, _, files in os.walk(os.path.join(out, "runs")):
        for name in sorted(files):
            if name.endswith(".json"):
                with open(os.path.join(root, name)) as f:
                    r = json.load(f)
                runs.setdefault((r["arch"], r["row"]), []).append(r)
    rows = []
    for (arch, row), rs in sorted(runs.items(), key=lambda kv: (kv[0][0], (ROWS + ABLATION).index(kv[0][1])
                                                                if kv[0][1] in ROWS + ABLATION else 99)):
        entry: dict[str, Any] = {"arch": arch, "row": row, "seeds": sorted(r["seed"] for r in rs),
                                 "params": rs[0]["cost"]["params"], "params_original": rs[0]["params_original"],
                                 "macs": rs[0]["cost"]["macs"],
                                 "latency_b1_ms": statistics.median(r["cost"]["latency_b1_ms"] for r in rs),
                                 "images_per_s_b32": statistics.median(r["cost"]["images_per_s_b32"] for r in rs),
                                 "calibration_s": statistics.mean(r.get("calibration", {}).get("seconds", 0.0)
                                                                  for r in rs)}
        for stage in STAGES:
            top1 = [r["stages"][stage]["top1"] for r in rs]
            entry[stage] = {"top1_mean": statistics.mean(top1),
                            "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                            "top1_min": min(top1), "top1_max": max(top1),
                            "agreement_mean": statistics.mean(r["stages"][stage]["agreement"] for r in rs)}
        rows.append(entry)
    for arch in {r["arch"] for r in rows}:
        path = os.path.join(out, f"speed_{arch}.json")
        if os.path.exists(path):  # the interleaved timings replace the in-run readings
            with open(path) as f:
                timed = json.load(f)["rows"]
            for r in rows:
                if r["arch"] == arch and r["row"] in timed:
                    r.update(timed[r["row"]], timing="interleaved")
    return {"rows": rows}


def _cell(stage: dict[str, float]) -> str:
    spread = f" ± {stage['top1_std']:.2f}" if stage["top1_std"] else ""
    return f"{stage['top1_mean']:.2f}{spread} / {stage['agreement_mean']:.3f}"


def table(summary: dict[str, Any], arch: str) -> str:
    rows = [[f"`{r['row']}`", f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}", len(r["seeds"]),
             _cell(r["converted"]), _cell(r["calibrated"]), _cell(r["fine-tuned"]), f"{r['calibration_s']:.0f}",
             f"{r['latency_b1_ms']:.2f}", f"{r['images_per_s_b32']:.0f}"]
            for r in summary["rows"] if r["arch"] == arch]
    return markdown_table(["row", "params", "MMACs", "seeds", "converted: top-1 % / agreement",
                           "calibrated", "fine-tuned", "calibration s", "b1 ms", "b32 img/s"], rows)


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
                s = r[stage]
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


def report(out: str) -> None:
    summary = summarise(out)
    if not summary["rows"]:
        print(f"no runs under {out}/runs yet")
        return
    archs = sorted({r["arch"] for r in summary["rows"]})
    md = "\n\n".join(f"### {a}\n\nOriginal: `{ORIGINALS[a]}`\n\n{table(summary, a)}" for a in archs)
    write_results(os.path.join(out, "conversion_study"), {**summary, "provenance": provenance()}, md)
    plot(summary, os.path.join(out, "conversion_study.png"))
    print(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=list(ORIGINALS), choices=list(ORIGINALS))
    p.add_argument("--rows", nargs="+", default=ROWS + ABLATION)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--all-lr", type=float, default=1e-3, help="distillation lr when every parameter trains")
    p.add_argument("--finetune-images", type=int, default=10_000)
    p.add_argument("--test-images", type=int, default=0, help="score on the first N test images (0: all 10,000)")
    p.add_argument("--data", default=None, help="Fashion-MNIST directory (default: the Debian package's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/conversion")
    p.add_argument("--report", action="store_true", help="only write the tables and the plot")
    p.add_argument("--speed", action="store_true", help="re-time every row on disk, interleaved, then report")
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.speed:
        speed(args)
    elif not args.report:
        todo = [(a, r, s) for s in args.seeds for a in args.arch for r in args.rows  # seed-major: spread noise
                if r not in ABLATION or s == args.seeds[0]]
        for i, (arch, row, seed) in enumerate(todo):
            path = os.path.join(args.out, "runs", arch, row, f"seed{seed}.json")
            if os.path.exists(path):
                continue
            print(f"[{i + 1}/{len(todo)}] {arch} {row} seed {seed}", flush=True)
            started = time.perf_counter()
            run_one(arch, row, seed, args, path)
            print(f"    done in {time.perf_counter() - started:.0f} s", flush=True)
    report(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
