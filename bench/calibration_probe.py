"""One calibration recipe on one conversion-study row, scored on the study's *validation* split (training
images held out from calibration and fine-tune, bench.common.validation_split), never on test images: the quick
probe for choosing calibrate's defaults. No fine-tune, one seed; the study (bench.conversion_study) is the
measurement.

    .venv/bin/python -m bench.calibration_probe resnet18_w025 kdna-r4 '{"train": "adapters", "features": 0}'
    .venv/bin/python -m bench.calibration_probe resnet18_w025 kdna-r4 '{"train": "all", "weight_lr": 3e-4}'

The second argument is a conversion_study row, the third CalibrationConfig fields over that row's own. Each probe
is written to ``bench/results/conversion/probe/<arch>_<row>_<fields>.json`` (with its provenance) and skipped when
that file exists, so a grid of probes resumes; ``--report`` tabulates them in ``probe/probe.md``.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

import torch

from kdna_fx.calibration import CalibrationConfig
from kdna_fx.train import build_data

from bench import conversion_study as cs
from bench.common import markdown_table, n_params, run_provenance, write_json
from bench.conversion_rows import recipe as make_recipe

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "conversion", "probe")


def record_path(arch: str, row: str, extra: dict) -> str:
    fields = "_".join(f"{k}-{v}" for k, v in sorted(extra.items())) or "defaults"
    return os.path.join(OUT, re.sub(r"[^A-Za-z0-9_.@-]+", "", f"{arch}_{row}_{fields}") + ".json")


def report() -> str:
    records = [json.load(open(os.path.join(OUT, f))) for f in sorted(os.listdir(OUT)) if f.endswith(".json")]
    rows = [[r["arch"], r["row"], json.dumps(r["fields"]), f"{r['top1']:.2f}", f"{r['agreement']:.3f}",
             r["seconds"]] for r in sorted(records, key=lambda r: -r["top1"])]
    text = markdown_table(["arch", "row", "fields over the defaults", "validation top-1 %", "agreement", "s"], rows)
    with open(os.path.join(OUT, "probe.md"), "w") as f:
        f.write("Calibration probes, scored on the validation split (5,000 training images held out), one seed; "
                "command per record in its JSON.\n\n" + text + "\n")
    return text


def main(argv: list[str]) -> int:
    if argv[:1] == ["--report"]:
        print(report())
        return 0
    arch, row, extra = argv[0], argv[1], json.loads(argv[2] if len(argv) > 2 else "{}")
    path = record_path(arch, row, extra)
    if os.path.exists(path):
        print(f"done already: {path}")
        return 0
    provenance = run_provenance(["python", "-m", "bench.calibration_probe", *argv])  # refuses a dirty tree first
    torch.set_num_threads(1)
    original, spec, _ = cs.load_original(arch)
    split = cs.Split.make(build_data("fashion-mnist"), 5_000)
    calib = split.calibration_images(1024, seed=0)[0]
    recipe = make_recipe(row, original, spec, calib, CalibrationConfig(progress=False), 1e-3)
    if recipe.calibration is None:
        raise SystemExit(f"row {row!r} is not calibrated: nothing to probe")
    recipe.calibration = recipe.calibration.replace(**extra)
    start = time.perf_counter()
    result = recipe.convert(original, calib, evaluate={"validation": split.loaders()["validation"]})
    record = {"arch": arch, "row": row, "fields": extra, "calibration": recipe.calibration.to_dict(),
              "params": n_params(result.model), **result.stages["calibrated"]["validation"],
              "scored_on": "validation split (5,000 training images)", "seconds": round(time.perf_counter() - start),
              "provenance": provenance}
    write_json(path, record)
    print(json.dumps({k: v for k, v in record.items() if k != "provenance"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
