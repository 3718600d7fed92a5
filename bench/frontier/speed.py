"""``--speed``: every row re-timed compiled and interleaved, one timing file per CPU."""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Callable

import torch
from tqdm import tqdm

import kdna_fx
from kdna_fx.timing import provenance, time_interleaved

from bench.common import write_json
from bench.frontier.queue import study_commit
from bench.frontier.rows import Row, deployable

def speed_path(out: str, cpu: str) -> str:
    """One timing file per CPU: batch-1 latency ratios differ between CPUs (the peers' most), so a re-timing on
    another machine adds a yardstick instead of replacing the last one; the same CPU's file is overwritten."""
    return os.path.join(out, "speed", re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") + ".json")


# Timings on disk that are not what they claim, by (file, row), each with its reason. The report leaves them out
# and says so; the files themselves stay as measured.
DISCARDED_TIMINGS: dict[tuple[str, str], str] = {
    ("speed/intel-r-xeon-r-processor.json", "plain-w0.5"):
        "ran uncompiled though marked compiled: it was the ninth graph on the plain rows' shared ResNet.forward, "
        "past dynamo's recompile limit (speed() now times every row as its own GraphModule)",
}


def load_timings(out: str) -> list[dict[str, Any]]:
    """Every CPU's last ``--speed`` record, newest first, without the entries in DISCARDED_TIMINGS."""
    directory = os.path.join(out, "speed")
    timings = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                record = json.load(f)
            file = f"speed/{name}"
            discarded = {row: why for (where, row), why in DISCARDED_TIMINGS.items()
                         if where == file and row in record["rows"]}
            timings.append({"cpu": record["provenance"]["machine"]["cpu"], "date_utc": record["provenance"]["date_utc"],
                            "file": file, "discarded": discarded,
                            "rows": {k: v for k, v in record["rows"].items() if k not in discarded}})
    return sorted(timings, key=lambda t: t["date_utc"], reverse=True)


def speed(args: argparse.Namespace) -> None:
    """Re-time every row in one process: batch-1 latency and batch-32 throughput of the deployable form, compiled
    (torch.compile, static shapes), rows interleaved (kdna_fx.timing.time_interleaved). Weights do not change the
    time, so each row is freshly built."""
    rows = [Row.of(name) for name in args.rows]
    one, batch = torch.randn(1, 1, 28, 28), torch.randn(32, 1, 28, 28)
    calls_b1: dict[str, Callable[[], Any]] = {}
    calls_b32: dict[str, Callable[[], Any]] = {}
    modes: dict[str, str] = {}
    # Dynamo keeps at most recompile_limit graphs per code object and past it runs the frame uncompiled, with only
    # a warning: the five plain widths at two batch sizes share ResNet.forward, and the last one was once timed
    # that way. So every row is timed as a GraphModule (its own forward code, as the KernelDNA and peer rows
    # already are), and a fallback raises instead of passing for compiled.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for row in tqdm(rows, desc="compile" if not args.eager else "build", unit="row"):
            model = deployable(row)
            model = model if isinstance(model, torch.fx.GraphModule) else kdna_fx.passes.trace(model)
            mode = "eager"
            if not args.eager:
                try:
                    compiled = torch.compile(model, dynamic=False)  # per-sample grouped convs need static shapes
                    with torch.inference_mode():
                        compiled(one), compiled(batch)
                    model, mode = compiled, "compiled"
                except Exception as exc:  # noqa: BLE001  (a row that does not compile is timed eagerly and marked)
                    mode = f"eager (compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                    tqdm.write(f"{row.name}: {mode}")
            modes[row.name] = mode
            calls_b1[row.name] = lambda m=model: m(one)
            calls_b32[row.name] = lambda m=model: m(batch)
        b1 = time_interleaved(calls_b1, warmup=5, repeat=args.speed_repeat, rounds=args.speed_rounds)
        b32 = time_interleaved(calls_b32, warmup=2, repeat=max(1, args.speed_repeat // 5), rounds=args.speed_rounds)
    result = {name: {"latency_b1_ms": 1e3 * b1[name]["median_s"], "latency_b1_iqr_rel": b1[name]["iqr_rel"],
                     "images_per_s_b32": 32 / b32[name]["median_s"], "b32_iqr_rel": b32[name]["iqr_rel"],
                     "mode": modes[name]} for name in calls_b1}
    prov = provenance()
    write_json(speed_path(args.out, prov["machine"]["cpu"]),
              {"rows": result, "rounds": args.speed_rounds, "repeat_b1": args.speed_repeat,
               "threads": torch.get_num_threads(), "timed_as": "GraphModule, dynamo fallbacks raise",
               "git": study_commit(args), "provenance": prov})
    for name, r in result.items():
        print(f"{name:>20}: b1 {r['latency_b1_ms']:.2f} ms, b32 {r['images_per_s_b32']:.0f} img/s ({r['mode']})")
