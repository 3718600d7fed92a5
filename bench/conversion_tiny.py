"""Conversion of a small trained model: copy vs trained init, low-rank residuals, centroid parents.

The model and data are kdna_fx.testing.blob_task's, which tests/test_calibrate.py uses too (a TinyResNet trained
60 steps on a synthetic 5-class blob task). Each row: transform, then kdna_fx.calibrate (bn + 100 distillation steps) on 256
unlabeled images; agreement and accuracy on 512 held-out images. A quick look at which steps matter, not
the Fashion-MNIST study of issue 6.

    .venv/bin/python -m bench.conversion_tiny
"""
from __future__ import annotations

import os
import sys
import time

import torch

import kdna_fx
from kdna_fx import AdapterConfig, CalibrationConfig, KDNAConfig
from kdna_fx.testing import blob_task

from bench.common import REPO, markdown_table, run_provenance, write_results

ROWS = [("copy init (paper)", KDNAConfig(), "copy"),
        ("trained init, rank 0", KDNAConfig(), "trained"),
        ("trained init, rank 2", KDNAConfig(adapter=AdapterConfig(rank=2)), "trained"),
        ("trained init, rank 4", KDNAConfig(adapter=AdapterConfig(rank=4)), "trained"),
        ("trained init, centroid, rank 2", KDNAConfig(adapter=AdapterConfig(rank=2), parent="centroid"), "trained")]


def main() -> None:
    torch.set_num_threads(1)
    prov = run_provenance(["-m", "bench.conversion_tiny", *sys.argv[1:]], force_dirty="--force-dirty" in sys.argv)
    model, calib, test_x, test_y = blob_task()

    @torch.no_grad()
    def scores(m: torch.nn.Module) -> tuple[float, float]:
        out, ref = m.eval()(test_x).argmax(1), model(test_x).argmax(1)
        return (out == ref).float().mean().item(), (out == test_y).float().mean().item()

    rows, table = [], []
    _, original_acc = scores(model)
    for label, config, init in ROWS:
        torch.manual_seed(1)
        kmodel = kdna_fx.transform(model, config, init=init)
        before = scores(kmodel)
        start = time.perf_counter()
        kdna_fx.calibrate(kmodel, calib, CalibrationConfig(steps=100, progress=False), reference=model)
        seconds = time.perf_counter() - start
        after = scores(kmodel)
        params = sum(p.numel() for p in kmodel.parameters())
        rows.append({"row": label, "params": params, "agreement_before": before[0], "top1_before": before[1],
                     "agreement_after": after[0], "top1_after": after[1], "calibration_s": seconds})
        table.append([label, f"{params:,}", f"{before[0]:.3f} / {100 * before[1]:.1f}",
                      f"{after[0]:.3f} / {100 * after[1]:.1f}", f"{seconds:.1f}"])
        print(table[-1], flush=True)
    md = (f"Original: {sum(p.numel() for p in model.parameters()):,} parameters, top-1 {100 * original_acc:.1f} % "
          f"(held-out, 512 images).\n\n" + markdown_table(
              ["row", "params", "right after transform: agreement / top-1 %", "after bn + distill (100 steps)",
               "calibration s"], table))
    write_results(os.path.join(REPO, "bench", "results", "conversion_tiny"),
                  {"provenance": prov, "original_top1": original_acc, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
