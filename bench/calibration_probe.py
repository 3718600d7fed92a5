"""One calibration recipe on one conversion-study row, scored on the study's *validation* split (training
images held out from calibration and fine-tune, bench.common.validation_split), never on test images: the quick
probe for choosing calibrate's defaults. No fine-tune, one seed; the study (bench.conversion_study) is the
measurement.

    .venv/bin/python -m bench.calibration_probe resnet18_w025 kdna-r4 '{"train": "adapters", "features": 0}'
    .venv/bin/python -m bench.calibration_probe resnet18_w025 kdna-r4 '{"train": "all", "weight_lr": 3e-4}'

The second argument is a conversion_study row, the third CalibrationConfig fields over that row's own.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from kdna_fx.calibration import CalibrationConfig
from kdna_fx.train import build_data

from bench import conversion_study as cs
from bench.common import n_params


def main(argv: list[str]) -> int:
    arch, row, extra = argv[0], argv[1], json.loads(argv[2] if len(argv) > 2 else "{}")
    torch.set_num_threads(1)
    original, spec = cs.load_original(arch)
    split = cs.Split.make(build_data("fashion-mnist"), 5_000)
    calib = split.calibration_images(1024, seed=0)[0]
    recipe = cs.make_recipe(row, original, spec, calib, CalibrationConfig(progress=False), 1e-3)
    if recipe.calibration is None:
        raise SystemExit(f"row {row!r} is not calibrated: nothing to probe")
    recipe.calibration = recipe.calibration.replace(**extra)
    start = time.perf_counter()
    result = recipe.convert(original, calib, evaluate={"validation": split.loaders()["validation"]})
    print(json.dumps({"arch": arch, "row": row, "calibration": recipe.calibration.to_dict(),
                      "params": n_params(result.model), **result.stages["calibrated"]["validation"],
                      "scored_on": "validation split (5,000 training images)",
                      "seconds": round(time.perf_counter() - start)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
