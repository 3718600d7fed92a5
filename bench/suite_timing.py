"""How long the README's commands take on a fresh clone: ``make test``, ``make test-fast``, ``make demo``.

Each target runs in a new ``git clone`` of the committed HEAD, with an empty Inductor cache and ``CI=true``, so
nothing this checkout has built or cached helps it. The clone's ``.venv`` is a virtual environment that reads
this checkout's installed libraries (a ``.pth`` line) and holds the clone's kdna_fx installed editable, as the
set-up installs it; its set-up stamp is touched: what is timed is the target's own command, not ``pip install``
(the README gives the set-up's time apart). One JSON record per target
under ``bench/results/suite/`` (the run's provenance, the wall time, pytest's summary line, the peak memory of
its largest process and of all its processes together, the load average before and after) and a Markdown table
of them all.

    .venv/bin/python -m bench.suite_timing test test-fast     # from a clean tree; about 9 minutes
    .venv/bin/python -m bench.suite_timing --report           # the table from the records on disk
"""
from __future__ import annotations

import argparse
import json
import os
import re
import site
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import REPO, DirtyTreeError, markdown_table, run_provenance, write_json

OUT = os.path.join(REPO, "bench", "results", "suite")
TARGETS = ("test", "test-fast", "demo")
GOALS = {"test": 360.0, "test-fast": 90.0}  # seconds (issue 34); the demo's goal is "about 5 minutes" with set-up
SUMMARY = re.compile(r"^=*\s*(?P<line>(\d+ (passed|failed|skipped|errors?|deselected|warnings?)[, ]*)+"
                     r"in (?P<seconds>[\d.]+)s.*?)\s*=*$", re.M)


def fresh_clone(workdir: str) -> str:
    """A clone of the committed HEAD under ``workdir`` whose ``.venv`` sees this checkout's packages."""
    clone = os.path.join(workdir, "repo")
    subprocess.run(["git", "clone", "-q", REPO, clone], check=True)
    venv = os.path.join(clone, ".venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    packages = site.getsitepackages()[0]
    target = os.path.join(venv, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")
    with open(os.path.join(target, "_suite_timing.pth"), "w") as f:
        f.write(f"{packages}\n")  # the installed libraries (torch, timm, ...), not pip-installed again
    # kdna_fx itself as `make`'s set-up installs it (editable, its console script), from the clone
    subprocess.run([sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"), "install", "-q",
                    "--no-deps", "--no-build-isolation", "-e", clone], check=True)
    open(os.path.join(venv, ".installed-stamp"), "w").close()  # newer than pyproject.toml: make skips pip
    return clone


# make runs under a process of its own, which reports (a) the largest resident set among its children (make,
# pytest, its workers): this command's alone, where this process's RUSAGE_CHILDREN would hold every earlier
# command's too; (b) the most memory the command held at once: the sum of its processes' proportional set sizes
# (a page shared by n processes counts 1/n in each), sampled every SAMPLE_S seconds (reading them every 0.5 s took
# 7 % of a core, slowing what it timed).
PEAK = "__suite_timing_peak_kib"
SAMPLE_S = 2.0
_UNDER_MEASURE = f"""
import resource, subprocess, sys, time
import psutil
interval, command = float(sys.argv[1]), subprocess.Popen(sys.argv[2:])
me, held = psutil.Process(), 0
while command.poll() is None:
    total = 0
    for child in me.children(recursive=True):
        try:
            total += child.memory_full_info().pss
        except psutil.Error:
            pass
    held = max(held, total)
    time.sleep(interval)
print("{PEAK}", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, held // 1024, file=sys.stderr)
sys.exit(command.returncode)
"""


def time_target(target: str, prov: dict[str, Any]) -> dict[str, Any]:
    """Run ``make <target>`` in a fresh clone; its wall time, pytest's summary and its peak memory."""
    with tempfile.TemporaryDirectory(prefix="kdna_suite_") as work:
        clone = fresh_clone(work)
        env = {**os.environ, "CI": "true", "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor")}
        load_before = os.getloadavg()
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _UNDER_MEASURE, str(SAMPLE_S), "make", "-s", target],
                              cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
    peak = re.search(rf"^{PEAK} (\d+) (\d+)$", done.stderr, re.M)
    out = done.stdout + done.stderr.replace(peak[0], "") if peak else done.stdout + done.stderr
    matches = list(SUMMARY.finditer(out))
    match = matches[-1] if matches else None  # the last summary is the run's own
    return {"target": target, "command": f"make {target}", "returncode": done.returncode, "wall_s": wall,
            "pytest_summary": match["line"] if match else None,
            "pytest_s": float(match["seconds"]) if match else None,
            "peak_rss_gb": int(peak[1]) / 2**20 if peak else None,
            "peak_held_gb": int(peak[2]) / 2**20 if peak else None,
            "load_before": load_before, "load_after": load_after, "goal_s": GOALS.get(target),
            "output_tail": out[-3000:], "provenance": prov}


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report() -> str:
    rows = []
    for target in TARGETS:
        path = os.path.join(OUT, f"{target}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            r = json.load(f)
        seconds = r["pytest_s"] if r["pytest_s"] is not None else r["wall_s"]
        met = "-" if r["goal_s"] is None else ("met" if seconds < r["goal_s"] and r["returncode"] == 0 else "missed")
        rows.append([f"`{r['command']}`", r["pytest_summary"] or f"exit {r['returncode']}",
                     f"{seconds // 60:.0f}:{seconds % 60:04.1f}", f"{r['wall_s'] // 60:.0f}:{r['wall_s'] % 60:04.1f}",
                     _gb(r.get("peak_rss_gb")), _gb(r.get("peak_held_gb")),
                     "{:.1f} / {:.1f}".format(r["load_before"][0], r["load_after"][0]),
                     "-" if r["goal_s"] is None else f"{r['goal_s'] / 60:g} min: {met}",
                     r["provenance"]["git"]["commit"][:7], r["provenance"]["machine"]["cpu"]])
    md = ("Each target in a fresh clone of the commit named, empty Inductor cache, `CI=true`, the set-up already "
          "done (`python -m bench.suite_timing`). Time: pytest's own where the target runs pytest, else the "
          "wall; met when under the goal and every test passed.\n\n" +
          markdown_table(["command", "result", "time", "wall", "peak GB, its largest process",
                          "peak GB, all its processes (PSS)", "load 1-min before / after", "goal", "commit",
                          "machine"], rows))
    with open(os.path.join(OUT, "suite_timing.md"), "w") as f:
        f.write(md + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", metavar="TARGET", help=f"make targets to time: {', '.join(TARGETS)}")
    p.add_argument("--report", action="store_true", help="only write the table from the records")
    args = p.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not (args.report or args.targets):
        p.error(f"name the targets to time ({', '.join(TARGETS)}), or --report" +
                (f"; not a target: {', '.join(unknown)}" if unknown else ""))
    os.makedirs(OUT, exist_ok=True)
    for target in [] if args.report else args.targets:
        try:  # the commit read now is the one the clone checks out
            prov = run_provenance(["-m", "bench.suite_timing", *args.targets], out=OUT)
        except DirtyTreeError as exc:
            raise SystemExit(str(exc)) from None
        print(f"make {target} in a fresh clone of {prov['git']['commit'][:7]} ...", flush=True)
        record = time_target(target, prov)
        write_json(os.path.join(OUT, f"{target}.json"), record)
        print(f"  {record['pytest_summary'] or 'exit ' + str(record['returncode'])}; wall {record['wall_s']:.0f} s")
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
