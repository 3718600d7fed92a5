"""Deploy files that keep the savings (issue 35): the shared and the folded form of a KernelDNA model, as files.

For ``kdna_resnet18`` and replace-mode ResNet-18 (``replace_resnet18``), ImageNet form (1000 classes), random
adapters and BatchNorm statistics moved by three batches (as bench/export_check.py), and the plain ``resnet18``
as the original: each model is written by ``kdna_fx.save`` (safetensors) and exported by ``kdna_fx.export`` with a
dynamic batch, shared (``fold=False``) and folded (``fold=True``), to ONNX and pt2. Per file: its size, the time
to load it (onnxruntime: the session, which constant-folds the shared form's kernels; pt2: ``torch.export.load``,
then ``torch.compile`` with Inductor freezing, whose first call per batch size is the compile) and its run speed
at batch 1 and 8, every file of a runtime and batch timed interleaved in one loop (kdna_fx.timing.time_interleaved),
one thread. "pt2 eager" runs the loaded program uncompiled: what a user gets without compiling it.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m bench.deploy_forms      # about 20 minutes on 2 shared cores
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch
from torch import nn

import kdna_fx
from bench.common import ready
from kdna_fx.datamodel import find_record
from kdna_fx.timing import git_commit, markdown_table, provenance, time_interleaved, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "export")
MODELS = ("kdna_resnet18", "replace_resnet18")
ORIGINAL = "resnet18"
BATCHES = (1, 8)
RUNTIMES = ("onnxruntime", "pt2 inductor", "pt2 eager")
# The target: the shared file runs within this much of the folded one (median over median, same runtime, batch).
SPEED_TARGET = 0.03


def _seconds(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Median seconds of ``repeat`` calls of ``fn`` and the last call's result."""
    samples, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def _onnx_session(path: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def files(name: str, model: nn.Module, shape: tuple[int, int, int], directory: str) -> dict[str, dict[str, Any]]:
    """The files of ``model``: safetensors, and ONNX and pt2 in each form there is (a plain model: one form)."""
    out: dict[str, dict[str, Any]] = {}
    path = os.path.join(directory, f"{name}.safetensors")
    kdna_fx.save(model, path)
    out["safetensors"] = {"path": path, "bytes": os.path.getsize(path)}
    forms = {"shared": False, "folded": True} if find_record(model) is not None else {"plain": False}
    for form, fold in forms.items():
        for fmt in ("onnx", "pt2"):
            path = os.path.join(directory, f"{name}.{form}.{fmt}")
            report = kdna_fx.export(model, path, input_shape=shape, format=fmt, fold=fold, dynamic_batch=True)
            out[f"{fmt} {form}"] = {"path": path, "bytes": report.bytes, "max_difference": report.max_difference,
                                    "form": form, "format": fmt}
            print(f"{name} {fmt} {form}: {report.bytes / 1e6:.1f} MB", flush=True)
    return out


def runners(entry: dict[str, Any], shape: tuple[int, int, int]) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Load one exported file in each runtime; records the load (and compile) seconds in ``entry``."""
    import torch._inductor.config as inductor_config

    path = entry["path"]
    if entry["format"] == "onnx":
        entry["load_s"], session = _seconds(lambda: _onnx_session(path))
        feed = session.get_inputs()[0].name
        return {"onnxruntime": lambda x: session.run(None, {feed: x.numpy()})}
    entry["load_s"], program = _seconds(lambda: torch.export.load(path).module())
    inductor_config.freezing = True  # the deploy route of docs/deployment.md: parameters become constants
    compiled = torch.compile(program, dynamic=False)
    entry["compile_s"] = {}
    with torch.inference_mode():  # as the timing runs it, so the compiled graphs are reused there
        for batch in BATCHES:
            start = time.perf_counter()
            compiled(torch.randn(batch, *shape))
            entry["compile_s"][str(batch)] = time.perf_counter() - start
    return {"pt2 inductor": compiled, "pt2 eager": program}


def measure(name: str, shape: tuple[int, int, int], seed: int, directory: str, rounds: int,
            repeat: int) -> dict[str, Any]:
    model = ready(name, shape[-1], seed)
    row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters()),
                           "files": files(name, model, shape, directory)}
    calls: dict[str, dict[str, Callable[[torch.Tensor], Any]]] = {}
    for key, entry in row["files"].items():
        if key != "safetensors":
            for runtime, fn in runners(entry, shape).items():
                calls.setdefault(runtime, {})[entry["form"]] = fn
    speed: dict[str, dict[str, Any]] = {}
    for runtime, forms in calls.items():
        for batch in BATCHES:
            x = torch.randn(batch, *shape)
            timed = time_interleaved({form: (lambda fn=fn: fn(x)) for form, fn in forms.items()},
                                     warmup=2, rounds=rounds, repeat=repeat)
            speed[f"{runtime} b{batch}"] = {form: {"median_ms": 1000 * t["median_s"], "iqr_rel": t["iqr_rel"]}
                                            for form, t in timed.items()}
            print(f"{name} {runtime} b{batch}: " + ", ".join(f"{f} {v['median_ms']:.2f} ms"
                                                             for f, v in speed[f"{runtime} b{batch}"].items()),
                  flush=True)
    row["speed"] = speed
    for entry in row["files"].values():
        os.remove(entry.pop("path"))
    return row


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def tables(rows: list[dict[str, Any]], original: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(sizes table, speed table, target lines)."""
    base = original["files"]
    size_rows = [[ORIGINAL + " (the original)", f"{original['params']:,}", _mb(base["safetensors"]["bytes"]),
                  "", _mb(base["onnx plain"]["bytes"]), "", _mb(base["pt2 plain"]["bytes"]), "", ""]]
    speed_rows, verdicts = [], []
    for r in rows:
        f = r["files"]
        size_rows.append([r["model"], f"{r['params']:,}", _mb(f["safetensors"]["bytes"]),
                          _mb(f["onnx shared"]["bytes"]), _mb(f["onnx folded"]["bytes"]),
                          _mb(f["pt2 shared"]["bytes"]), _mb(f["pt2 folded"]["bytes"]),
                          f"{f['onnx shared']['load_s']:.2f} / {f['onnx folded']['load_s']:.2f}",
                          f"{f['pt2 shared']['load_s']:.2f} / {f['pt2 folded']['load_s']:.2f}"])
        for key, forms in r["speed"].items():
            shared, folded = forms["shared"], forms["folded"]
            ratio = shared["median_ms"] / folded["median_ms"]
            speed_rows.append([r["model"], key, f"{shared['median_ms']:.2f} (IQR {100 * shared['iqr_rel']:.0f} %)",
                               f"{folded['median_ms']:.2f} (IQR {100 * folded['iqr_rel']:.0f} %)", f"{ratio:.3f}"])
            r.setdefault("ratios", {})[key] = ratio
        overhead = f["onnx shared"]["bytes"] / f["safetensors"]["bytes"]
        worst = {k: v for k, v in r["ratios"].items() if not k.startswith("pt2 eager")}
        key, ratio = max(worst.items(), key=lambda kv: kv[1])
        verdicts.append(f"{r['model']}: shared ONNX file {_mb(f['onnx shared']['bytes'])} MB = {overhead:.3f} x its "
                        f"safetensors file ({_mb(f['safetensors']['bytes'])} MB), {_mb(f['onnx folded']['bytes'])} MB "
                        f"folded; slowest shared/folded ratio over the compiled runtimes {ratio:.3f} ({key}): speed "
                        f"target (within {100 * SPEED_TARGET:.0f} %) {'met' if ratio <= 1 + SPEED_TARGET else 'NOT met'}")
    sizes = markdown_table(["model", "parameters", "safetensors MB", "ONNX shared MB", "ONNX folded MB",
                            "pt2 shared MB", "pt2 folded MB", "ONNX load s (shared / folded)",
                            "pt2 load s (shared / folded)"], size_rows)
    speed = markdown_table(["model", "runtime, batch", "shared ms", "folded ms", "shared / folded"], speed_rows)
    return sizes, speed, verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="zoo names of transformed models")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per timing")
    p.add_argument("--repeat", type=int, default=5, help="calls per row and round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    git = git_commit(exclude=("bench/results",))
    shape = (3, args.image_size, args.image_size)
    with tempfile.TemporaryDirectory(prefix="kdna_deploy_forms_") as directory:
        original = measure(ORIGINAL, shape, args.seed, directory, args.rounds, args.repeat)
        rows = [measure(name, shape, args.seed, directory, args.rounds, args.repeat) for name in args.models]
    sizes, speed, verdicts = tables(rows, original)
    payload = {"original": original, "rows": rows, "image_size": args.image_size, "batches": list(BATCHES),
               "speed_target": SPEED_TARGET, "verdicts": verdicts, "git": git,
               "provenance": provenance([os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])])}
    import onnx
    import onnxruntime
    import onnxscript

    payload["provenance"]["versions"].update(onnx=onnx.__version__, onnxscript=onnxscript.__version__,
                                             onnxruntime=onnxruntime.__version__)
    md = (f"# Deploy files: the shared and the folded form (issue 35)\n\n"
          f"ImageNet form (1000 classes), {args.image_size} px, dynamic-batch files written by `kdna_fx.export`; "
          f"random adapters, BatchNorm statistics moved by three batches. Shared: `fold=False` (each parent kernel "
          f"once; onnxruntime folds the children's kernels when the session starts, Inductor freezing when it "
          f"compiles). Folded: `fold=True` (a kernel per child in the file). Load: median of 3 (onnxruntime: the "
          f"session; pt2: `torch.export.load(...).module()`); compile seconds are in the JSON.\n\n"
          + "\n".join(f"- {v}" for v in verdicts) + "\n\n## File sizes and load times\n\n" + sizes
          + f"\n\n## Run speed (median ms per call; {args.rounds} rounds x {args.repeat} calls, shared and folded "
            f"interleaved; torch threads and onnxruntime threads: {torch.get_num_threads()}; a shared 2-core "
            f"machine, so read ratios)\n\n" + speed
          + f"\n\n\"pt2 eager\" is the loaded program run without compiling: the shared form then computes every "
            f"child's kernel in each call.\n\nGit commit: `{git['commit']}`{' (dirty tree)' if git['dirty'] else ''}\n")
    write_results(os.path.join(args.out, "deploy_forms"), payload, md)
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
