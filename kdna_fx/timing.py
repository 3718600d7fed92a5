"""Timing and provenance: the demo, kdna_fx.train (metrics.json), the commands' records and the bench/ scripts use
these helpers."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from .utils import atomic_path, write_json


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


def host_id() -> str:
    """A short stable id of this machine (a hash of /etc/machine-id and the host name): two machines with the
    same CPU model get different ids, and the id reveals neither."""
    try:
        with open("/etc/machine-id") as f:
            machine = f.read().strip()
    except OSError:
        machine = ""
    return hashlib.sha256(f"{machine}/{socket.gethostname()}".encode()).hexdigest()[:10]


def cpu_model() -> str:
    """The CPU's model name with its family, model and stepping numbers: virtual machines often report a bare
    "AMD EPYC", which names several generations."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "stepping") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    numbers = [f"{k.replace('cpu ', '')} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """The exact command, machine (CPU model, host id, platform), versions and the git commit with its dirty
    flag (bench/results aside: the studies' own outputs) behind a set of numbers: the one provenance every
    record carries. Call it when a run *starts*: the commit that ran is the one checked out then."""
    import einops
    import torchvision

    cpu = cpu_model()
    return {
        "command": " ".join([os.path.relpath(sys.executable)] + (argv if argv is not None else sys.argv)),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"cpu": cpu, "host_id": host_id(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "einops": einops.__version__},
        "git": git_commit(exclude=("bench/results",)),
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


def write_results(path_stem: str, payload: dict[str, Any], markdown_table: str, *, command: str | None = None) -> None:
    """Write ``<stem>.json`` and ``<stem>.md`` (the table plus its provenance). ``command``: the command line the
    Markdown shows, when the user typed another than the provenance's (``kdna convert ...``, not the Python
    behind it)."""
    write_json(f"{path_stem}.json", payload)
    prov = payload["provenance"]
    machine = prov["machine"]
    host = f" (host {machine['host_id']})" if machine.get("host_id") else ""
    text = (markdown_table.rstrip() + "\n\n" + f"Command: `{command or prov['command']}`  \n"
            + f"Machine: {machine['cpu']}{host}, {machine['cores']} cores, "
              f"torch threads: {machine['torch_threads']}, GPU: {machine['gpu']}  \n"
            + "Versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()) + "  \n"
            + f"Date (UTC): {prov['date_utc']}\n")
    with atomic_path(f"{path_stem}.md") as tmp, open(tmp, "w") as f:
        f.write(text)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
