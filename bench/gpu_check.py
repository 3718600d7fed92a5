"""The GPU check (issue 25): everything a lent GPU machine should measure, in one command, under 8 minutes.

    make gpu-check                                   # = .venv/bin/python bench/gpu_check.py
    .venv/bin/python bench/gpu_check.py --dry-run    # CPU, tiny sizes, seconds: what the test suite runs

Three parts, each recorded even when another fails:
1. tests: the suite's CUDA tests (tests/test_cuda.py and the CUDA test of tests/test_calibrate.py);
2. gradients: one compiled training step of transformed ResNet-18 and ResNet-50 against eager float64
   (kdna_fx.testing.check_compiled_gradients, Inductor);
3. speed: bench/speed.py on the GPU for ResNet-18 (baseline, replace mode unfolded and folded, the reference
   topology, ODConv 1x) and ResNet-50: batches 1, 32 and 256, eager, Inductor and Inductor with CUDA graphs,
   interleaved; bf16 autocast inference; one training step at batch 128 under bf16 autocast.

Writes bench/results/gpu/gpu_check.{json,md} (with the command, GPU, driver and versions) and the speed suite's
own files under bench/results/gpu/speed/. ``--dry-run`` writes under ``--out`` (a temporary folder by default).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "gpu")


def _driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def part_tests(dry_run: bool, out: str) -> dict[str, Any]:
    """The CUDA tests, in a subprocess, with their JUnit report."""
    if dry_run:
        return {"status": "not run (dry run: the CUDA tests skip without a GPU)"}
    report = os.path.join(out, "cuda_tests.xml")
    # -P: the repository root stays off sys.path, so the installed kdna_fx (with its passes) is the one imported
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:randomly", "tests/test_cuda.py",
           "tests/test_calibrate.py", "-k", "cuda", f"--junitxml={report}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return {"command": " ".join(cmd[2:]), "exit_code": done.returncode, "summary": done.stdout.strip().splitlines()[-1:],
            "status": "passed" if done.returncode == 0 else "failed", "junit": os.path.relpath(report, ROOT)}


def part_gradients(dry_run: bool, device: torch.device) -> dict[str, Any]:
    """Compiled training gradients against eager float64 for transformed ResNets (TinyResNet in a dry run)."""
    import torchvision

    import kdna_fx
    from kdna_fx.testing import TinyResNet, check_compiled_gradients, randomize_adapters

    builders: dict[str, Callable[[], torch.nn.Module]] = (
        {"TinyResNet": lambda: TinyResNet(width=4)} if dry_run else
        {"resnet18": lambda: torchvision.models.resnet18(), "resnet50": lambda: torchvision.models.resnet50()})
    size, batch, backend = (16, 4, "aot_eager") if dry_run else (224, 16, "inductor")
    out = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        kmodel = kdna_fx.transform(build())
        randomize_adapters(kmodel)
        start = time.perf_counter()
        result = check_compiled_gradients(kmodel.to(device).train(),
                                          (torch.randn(batch, 3, size, size, device=device),), backend=backend)
        out[name] = {"ok": result.ok, "worst": result.worst, "error": result.error,
                     "eager_error": result.eager_error, "scale": result.scale, "backend": result.backend,
                     "seconds": time.perf_counter() - start}
    return out


def speed_args(dry_run: bool, out: str) -> list[str]:
    """The speed suite's command line for this check."""
    if dry_run:
        # Dynamo's tracing of each compiled row is what costs time here: one batch, no variants.
        return ["--device", "cpu", "--groups", "mobilenet_v2", "--modes", "eager", "cudagraphs", "--batches", "2",
                "--image-size", "16", "--repeat", "1", "--rounds", "1", "--train", "--train-batch", "2",
                "--train-amp", "bf16", "--train-repeat", "1", "--train-rows", "replace", "--backend", "eager",
                "--out", out]
    return ["--device", "cuda", "--groups", "resnet18", "resnet50", "--modes", "eager", "inductor", "cudagraphs",
            "--batches", "1", "32", "256", "--rounds", "3", "--variants", "bf16", "--train", "--train-batch", "128",
            "--train-amp", "bf16", "--train-repeat", "3", "--out", out]


def part_speed(dry_run: bool, out: str) -> dict[str, Any]:
    args = speed_args(dry_run, out)
    start = time.perf_counter()
    # The speed suite as its own process, run as the module bench.speed from the repository root (it imports
    # bench.common); it writes its results under ``out``.
    subprocess.run([sys.executable, "-m", "bench.speed", *args], cwd=ROOT, check=True)
    return {"args": args, "seconds": time.perf_counter() - start, "results": os.path.relpath(out, ROOT)
            if out.startswith(ROOT) else out}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds (the test suite runs this)")
    p.add_argument("--out", default=None, help=f"default: {os.path.relpath(OUT, ROOT)} (a temporary folder with "
                                                 f"--dry-run)")
    p.add_argument("--parts", nargs="+", default=["tests", "gradients", "speed"],
                   choices=["tests", "gradients", "speed"])
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py: no CUDA device here; run it on a GPU machine, or pass --dry-run")
    out = args.out or (tempfile.mkdtemp(prefix="kdna_gpu_check_") if args.dry_run else OUT)
    os.makedirs(out, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    from kdna_fx.timing import git_commit, provenance

    record: dict[str, Any] = {"provenance": provenance(["bench/gpu_check.py", *(argv or sys.argv[1:])]),
                              "commit": git_commit(exclude=("bench/results/gpu",)), "driver": _driver(),
                              "dry_run": args.dry_run, "parts": {}}
    runners = {"tests": lambda: part_tests(args.dry_run, out),
               "gradients": lambda: part_gradients(args.dry_run, device),
               "speed": lambda: part_speed(args.dry_run, os.path.join(out, "speed"))}
    for part in args.parts:
        start = time.perf_counter()
        try:
            record["parts"][part] = {"status": "done", **runners[part]()}
        except Exception as exc:  # noqa: BLE001 - one failing part must not cost the others' minutes
            record["parts"][part] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        record["parts"][part]["seconds_total"] = time.perf_counter() - start
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(_markdown(record, out))
    print(_markdown(record, out))
    return record


def _markdown(record: dict[str, Any], out: str) -> str:
    prov = record["provenance"]
    lines = ["# GPU check" + (" (dry run)" if record["dry_run"] else ""), "",
             f"Command: `{prov['command']}`; commit {record['commit']['commit']}"
             f"{' (with uncommitted changes)' if record['commit']['dirty'] else ''}; GPU "
             f"{prov['machine']['gpu']}; driver {record['driver']}; torch {prov['versions']['torch']}; "
             f"{prov['date_utc']} UTC", ""]
    for part, result in record["parts"].items():
        lines.append(f"- **{part}** ({result['seconds_total']:.0f} s): {result.get('status')}"
                     + (f": {result['error']}" if "error" in result else ""))
        if part == "gradients":
            lines += [f"  - {name}: {'ok' if r['ok'] else 'DIFFERS'} ({r['backend']}), worst {r['worst']!r}, "
                      f"error {r['error']:.3g} against eager float32's {r['eager_error']:.3g}"
                      for name, r in result.items() if isinstance(r, dict)]
        if part == "tests" and "summary" in result:
            lines.append(f"  - {' '.join(result['summary'])}")
    if "speed" in record["parts"]:
        lines.append(f"\nThe speed suite's tables and targets: {os.path.join(out, 'speed')}/speed_*.md")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
