"""Timing and provenance: the demo, kdna_fx.train (metrics.json) and the bench/ scripts use these helpers."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch


def time_call(fn: Callable[[], Any], *, warmup: int = 3, repeat: int = 10) -> dict[str, float]:
    """Median and spread of ``repeat`` timed calls (seconds) after ``warmup`` untimed ones."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "repeat": repeat}


def time_interleaved(calls: dict[str, Callable[[], Any]], *, warmup: int = 3, repeat: int = 10,
                     rounds: int = 5, sync: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    """Time several rows fairly on a shared machine: every row is warmed up, then ``rounds`` rounds run each
    row ``repeat`` times in turn (rows interleaved, so a slow phase of the machine lands on all of them).

    Per row: the median, min and max of the ``rounds * repeat`` samples (seconds) and the relative spread
    (interquartile range over median). ``sync`` (e.g. torch.cuda.synchronize) runs after every call.
    """
    sync = sync or (lambda: None)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            for _ in range(warmup):
                fn()
            sync()
        for _ in range(rounds):
            for name, fn in calls.items():
                for _ in range(repeat):
                    start = time.perf_counter()
                    fn()
                    sync()
                    samples[name].append(time.perf_counter() - start)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        med = statistics.median(s)
        out[name] = {"median_s": med, "min_s": min(s), "max_s": max(s), "iqr_rel": (q[2] - q[0]) / med,
                     "samples": len(s)}
    return out


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """The exact command, machine and versions behind a set of numbers."""
    import einops
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "command": " ".join([os.path.relpath(sys.executable)] + (argv if argv is not None else sys.argv)),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "einops": einops.__version__},
    }


def git_commit(exclude: tuple[str, ...] = (), root: str | None = None) -> dict[str, Any]:
    """The commit of a checkout (by default the one holding kdna_fx) and whether its tracked files differ from it.

    Paths in ``exclude`` (relative to the checkout) do not count as changes: a study's own outputs, say.
    Both values are None outside a git checkout.
    """
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in exclude))
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def write_results(path_stem: str, payload: dict[str, Any], markdown_table: str) -> None:
    """Write ``<stem>.json`` and ``<stem>.md`` (the table plus its provenance)."""
    os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
    with open(f"{path_stem}.json", "w") as f:
        json.dump(payload, f, indent=2)
    prov = payload["provenance"]
    with open(f"{path_stem}.md", "w") as f:
        f.write(markdown_table.rstrip() + "\n\n")
        f.write(f"Command: `{prov['command']}`  \n")
        f.write(f"Machine: {prov['machine']['cpu']}, {prov['machine']['cores']} cores, "
                f"torch threads: {prov['machine']['torch_threads']}, GPU: {prov['machine']['gpu']}  \n")
        f.write("Versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()) + "  \n")
        f.write(f"Date (UTC): {prov['date_utc']}\n")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
