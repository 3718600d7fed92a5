"""One calibration recipe on one conversion-study row, scored on 2,000 test images: the quick probe used to
choose calibrate's defaults (issue 6). No fine-tune, one seed; the study (bench/conversion_study.py) is the
measurement.

    .venv/bin/python bench/calibration_probe.py resnet18_w025 kdna-r4 '{"train": "adapters", "features": 0}'
    .venv/bin/python bench/calibration_probe.py resnet18_w025 kdna-r4 '{"train": "all", "weight_lr": 3e-4}'

The second argument is a conversion_study row, the third calibrate() options over that row's own.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conversion_study as cs  # noqa: E402

import kdna_fx  # noqa: E402
from kdna_fx.train import build_data  # noqa: E402


def main(argv: list[str]) -> int:
    arch, row, extra = argv[0], argv[1], json.loads(argv[2] if len(argv) > 2 else "{}")
    torch.set_num_threads(1)
    original, spec = cs.load_original(arch)
    data = build_data("fashion-mnist")
    test = DataLoader(Subset(data.val, range(2000)), batch_size=500)
    calib = cs.calibration_images(data, 1024, seed=0)[0]
    student, options, _ = cs.make_student(row, original, spec, 1e-3, calib)
    options = {**(options or {}), **extra}
    start = time.perf_counter()
    kdna_fx.calibrate(student, calib, reference=original, progress=False, **options)
    print(json.dumps({"arch": arch, "row": row, "options": options, "params": cs.n_params(student),
                      **cs.score(student, original, test), "seconds": round(time.perf_counter() - start)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
