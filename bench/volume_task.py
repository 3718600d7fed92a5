"""A small 3-D task (issue 32): segment spheres in synthetic volumes, a MONAI 3-D UNet against its KernelDNA form.

As MONAI's own tutorials do: ``monai.data.synthetic.create_test_image_3d`` volumes (noisy spheres on a dark
background, one foreground class), a ``monai.networks.nets.UNet(spatial_dims=3)``. Each seed builds the UNet,
and its KernelDNA form in replace mode (``kdna_fx.transform`` with the default config but ``stage_depth=0``:
MONAI nests its levels, so the first path component is the whole model anyway), trained from scratch with the
same recipe (Adam, Dice loss, the same batches in the same order); reported: test Dice (sigmoid > 0.5, mean over
the test volumes), parameters, training time. Judged by the paired difference per seed (same init seed, same
data), and by bench.common.compare over the seeds.

    nice -n 10 .venv/bin/python -m bench.volume_task            # 3 seeds, about 10-15 min on one thread
    .venv/bin/python -m bench.volume_task --steps 10 --seeds 0 --force-dirty   # a smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from monai.data.synthetic import create_test_image_3d
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from torch import Tensor, nn

import kdna_fx

from bench.common import REPO, compare, markdown_table, n_params, run_provenance, write_results

SIZE = 32
CHANNELS = (8, 16, 32, 64)
TRAIN, TEST, BATCH = 64, 16, 4
CONFIG = kdna_fx.KDNAConfig(stage_depth=0)


def volumes(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` synthetic volumes [n, 1, SIZE, SIZE, SIZE] and their sphere masks, from one seeded generator."""
    rng = np.random.RandomState(seed)
    pairs = [create_test_image_3d(SIZE, SIZE, SIZE, num_objs=4, rad_max=8, rad_min=3, noise_max=0.5,
                                  num_seg_classes=1, channel_dim=0, random_state=rng) for _ in range(n)]
    return (torch.from_numpy(np.stack([p[0] for p in pairs])).float(),
            torch.from_numpy(np.stack([p[1] for p in pairs])).float())


def unet() -> nn.Module:
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=CHANNELS, strides=(2, 2, 2), num_res_units=2)


@torch.no_grad()
def dice(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean over the volumes of the Dice of (sigmoid > 0.5) against the mask."""
    pred = (torch.sigmoid(model.eval()(x)) > 0.5).float()
    inter = (pred * y).flatten(1).sum(1)
    return float((2 * inter / (pred.flatten(1).sum(1) + y.flatten(1).sum(1)).clamp_min(1e-8)).mean())


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, seed: int) -> float:
    """The one recipe: Adam 3e-3, Dice loss on sigmoid outputs, batches of BATCH drawn by ``seed``; seconds."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = DiceLoss(sigmoid=True)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(x), (BATCH,), generator=g)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--force-dirty", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="kdna_fx")
    prov = run_provenance(["-m", "bench.volume_task", *sys.argv[1:]], force_dirty=args.force_dirty)
    train_x, train_y = volumes(TRAIN, seed=1000)
    test_x, test_y = volumes(TEST, seed=2000)
    rows = []
    for seed in args.seeds:
        for arm in ("baseline", "kerneldna"):
            torch.manual_seed(seed)
            model = unet()
            if arm == "kerneldna":
                model = kdna_fx.transform(model, CONFIG, example_inputs=(train_x[:2],))
            seconds = train(model, train_x, train_y, args.steps, seed)
            rows.append({"seed": seed, "arm": arm, "params": n_params(model), "dice": dice(model, test_x, test_y),
                         "train_s": seconds})
            print(rows[-1], flush=True)
    by = {arm: [r for r in rows if r["arm"] == arm] for arm in ("baseline", "kerneldna")}
    diffs = [k["dice"] - b["dice"] for b, k in zip(by["baseline"], by["kerneldna"])]
    summary = {"paired_dice_difference": diffs, "mean_difference": statistics.fmean(diffs),
               "outcome": compare([r["dice"] for r in by["kerneldna"]], [r["dice"] for r in by["baseline"]]),
               "within_0.02": statistics.fmean(diffs) >= -0.02}
    table = [[r["seed"], r["arm"], f"{r['params']:,}", f"{r['dice']:.4f}", f"{r['train_s']:.0f}"] for r in rows]
    md = (f"MONAI UNet(spatial_dims=3, channels={CHANNELS}, strides=(2, 2, 2), num_res_units=2) on "
          f"create_test_image_3d spheres, {SIZE}^3, {TRAIN} training and {TEST} test volumes; {args.steps} steps of "
          f"Adam 3e-3 at batch {BATCH}, Dice loss; KernelDNA: kdna_fx.transform(KDNAConfig(stage_depth=0)), "
          f"replace mode, trained from scratch the same way (same seed, same batches). One CPU thread; times are "
          f"noisy (a shared machine).\n\n"
          + markdown_table(["seed", "arm", "params", "test Dice", "train s"], table)
          + f"\n\nPaired Dice difference (KernelDNA - baseline) per seed: "
          + ", ".join(f"{d:+.4f}" for d in diffs)
          + f"; mean {summary['mean_difference']:+.4f}; over the seeds: {summary['outcome']} "
            f"(bench.common.compare). Target: within 0.02 Dice: {'met' if summary['within_0.02'] else 'not met'}.\n"
          + f"\nCommit: {prov['git']['commit']}{' (dirty tree)' if prov['git']['dirty'] else ''}\n")
    write_results(os.path.join(REPO, "bench", "results", "volume", "volume_task"),
                  {"provenance": prov, "steps": args.steps, "rows": rows, "summary": summary}, md)
    print(md)


if __name__ == "__main__":
    main()
