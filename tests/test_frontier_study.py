"""Smoke test of bench.frontier_study: a tiny budget end to end, skip when done, exact mid-run resume, and the
targets judged by the one rule of bench.common."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from kdna_fx.timing import provenance
from kdna_fx.train import build_data

from bench import common
from bench.frontier import queue as frontier_queue
from bench.frontier import rows as frontier_rows
from bench.frontier import speed as frontier_speed
from bench.frontier import verdicts as frontier_verdicts

DATA = "/usr/share/datasets/fashion-mnist"

# Tier bench: a smoke run of a bench/ script (make test-all) (runs the frontier study's scripts on tiny settings).
pytestmark = [pytest.mark.bench,
              pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz")),
                                 reason="Fashion-MNIST is not installed (make data)")]


# Rows of the tiny smoke runs (and one the targets test judges), added to the study's table for this module only:
# a row is a zoo name with its tag and create_model options, like every row of the study.
TEST_ROWS = {"plain-w0.0625": ("resnet18.plain", dict(width=0.0625)),
             "replace-w0.0625": ("resnet18.replace", dict(width=0.0625)),
             "kdna-w0.0625": ("resnet18.kdna", dict(width=0.0625)),
             "dyconv-k2-w0.0625": ("resnet18.dyconv", dict(width=0.0625, kernels=2, init="scratch")),
             "relaxed-r4-w0.375": ("resnet18.relaxed", dict(width=0.375, rank=4))}


@pytest.fixture(scope="module")
def study():
    from bench import frontier_study as module

    before = torch.get_num_threads()
    table = dict(frontier_rows.ROW_TABLE)
    for name, (model, options) in TEST_ROWS.items():
        frontier_rows.define(name, model, **options)
    yield module
    frontier_rows.ROW_TABLE.clear()
    frontier_rows.ROW_TABLE.update(table)
    torch.set_num_threads(before)


def tiny(tmp_path, rows, *extra):
    return ["--rows", *rows, "--seeds", "0", "--epochs", "2", "--train-subset", "256", "--test-subset", "256",
            "--batch-size", "32", "--limit-steps", "2", "--out", str(tmp_path / "out"),
            "--run-root", str(tmp_path / "runs"), "--force-dirty", *extra]  # the suite may run on a dirty tree


def record(tmp_path, row, seed=0):
    with open(tmp_path / "out" / "runs" / row / f"seed{seed}.json") as f:
        return json.load(f)


def test_queue_skip_and_report(study, tmp_path, capsys):
    rows = ["plain-w0.0625", "replace-w0.0625", "dyconv-k2-w0.0625"]
    assert study.main(tiny(tmp_path, rows)) == 0
    for row in rows:
        r = record(tmp_path, row)
        assert r["epochs"] == 2 and 0 <= r["test_top1"] <= 100 and r["test_images"] == 256
        assert r["git"]["commit"] and r["provenance"]["versions"]["torch"]
    assert record(tmp_path, "replace-w0.0625")["params"] < record(tmp_path, "plain-w0.0625")["params"]
    dy = torch.load(tmp_path / "runs" / "dyconv-k2-w0.0625" / "seed0" / "last.pt", weights_only=False)
    assert int(dy["model"]["anneal_step"]) == 4  # DY-Conv's temperature schedule counted every training step

    stamp = os.path.getmtime(tmp_path / "out" / "runs" / "plain-w0.0625" / "seed0.json")
    capsys.readouterr()
    assert study.main(tiny(tmp_path, rows)) == 0  # everything done: nothing retrained
    assert os.path.getmtime(tmp_path / "out" / "runs" / "plain-w0.0625" / "seed0.json") == stamp
    out = capsys.readouterr().out
    assert "3 runs, 3 done" in out and "report left as it was" in out
    assert not (tmp_path / "out" / "frontier.md").exists()  # a narrowed queue leaves the study's report alone

    assert study.main(tiny(tmp_path, rows, "--speed", "--eager", "--speed-rounds", "1", "--speed-repeat", "5")) == 0
    with open(tmp_path / "out" / "frontier.json") as f:
        summary = json.load(f)
    assert [r["row"] for r in summary["rows"]] == rows
    assert all(r["latency_b1_ms"] > 0 and r["macs"] > 0 and len(r["seeds"]) == 1 for r in summary["rows"])
    md = (tmp_path / "out" / "frontier.md").read_text()
    assert md.split("paired by seed")[0].count("`dyconv-k2-w0.0625`") == 1  # one row in the table (the paired one follows)
    machine = record(tmp_path, "plain-w0.0625")["provenance"]["machine"]
    cpu = machine["cpu"]
    assert summary["trained_on"] == {common.machine_label(machine): 3} and summary["timings"][0]["cpu"] == cpu
    assert [t["file"] for t in summary["timings"]] == [os.path.relpath(frontier_speed.speed_path("", cpu))]  # per CPU
    assert (f"the runs trained on {common.machine_label(machine)} (3 runs). The latency and throughput columns were "
            f"timed on {cpu}") in md
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 0


def test_mid_run_resume_is_exact(study, tmp_path):
    row = "kdna-w0.0625"
    whole = tmp_path / "whole"
    assert study.main(tiny(whole, [row])) == 0

    class Stop(Exception):
        pass

    def stop_after_first_epoch(epoch, _record):
        if epoch == 1:
            raise Stop

    split = tmp_path / "split"
    args = study.parse_args(tiny(split, [row]))
    data = build_data("fashion-mnist", None, train_subset=256, val_subset=256, seed=0)
    with pytest.raises(Stop):  # a session ending mid-run: the epoch-1 checkpoint is on disk, no record yet
        frontier_queue.run_one(frontier_rows.Row.of(row), 0, args, data, on_epoch_end=stop_after_first_epoch)
    assert not (split / "out" / "runs" / row / "seed0.json").exists()
    assert study.main(tiny(split, [row], "--report")) == 0
    assert "epoch 1/2 done" in (split / "out" / "frontier.md").read_text()

    assert study.main(tiny(split, [row])) == 0
    resumed, uninterrupted = record(split, row), record(whole, row)
    assert resumed["resumed"] and not uninterrupted["resumed"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in uninterrupted["history"]]
    assert resumed["test_top1"] == uninterrupted["test_top1"]


def test_bad_arguments(study, tmp_path):
    with pytest.raises(SystemExit, match="unknown row 'resnet-w0.25'"):
        study.parse_args(["--rows", "resnet-w0.25"])
    with pytest.raises(SystemExit, match="unknown row 'plain-w0'.*one define"):
        study.parse_args(["--rows", "plain-w0"])  # rows come from the table, not from a grammar of names
    with pytest.raises(SystemExit):
        study.parse_args(["--rows", "plain-w0.25", "plain-w0.25"])


def test_lock_keeps_a_second_process_off(tmp_path):
    directory = str(tmp_path / "run")
    assert common.take_lock(directory)
    with open(os.path.join(directory, "lock"), "w") as f:
        f.write("1")  # pid 1 is alive: another process holds the run
    assert not common.take_lock(directory)
    with open(os.path.join(directory, "lock"), "w") as f:
        f.write("999999999")  # no such process: a stale lock is taken over
    assert common.take_lock(directory)
    common.release_lock(directory)
    assert not os.path.exists(os.path.join(directory, "lock"))


def test_targets_are_judged_against_the_plain_curve(study):
    def row(name, params, ms, seeds, lo, hi):
        kind = frontier_rows.Row.of(name).kind
        top1 = [lo, hi, (lo + hi) / 2][:seeds]  # one seed: lo == hi
        return {"row": name, "kind": kind, "params": params, "latency_b1_ms": ms, "seeds": list(range(seeds)),
                "top1": top1, "top1_mean": (lo + hi) / 2, "top1_min": lo, "top1_max": hi}

    def judged(rows, *other_cpus):
        """targets() with the rows' own latencies as CPU "A" (the newest timing), then any other CPU's."""
        timings = [{"cpu": "A", "rows": {r["row"]: {"latency_b1_ms": r["latency_b1_ms"]} for r in rows}}]
        found = frontier_verdicts.targets({"rows": rows, "timings": timings + list(other_cpus)}, seeds=3)
        return {v["row"]: v for v in found}

    rows = [row("plain-w0.125", 100, 1.0, 3, 89.5, 90.5), row("plain-w0.25", 400, 2.0, 3, 91.5, 92.5),
            row("replace-w0.25", 200, 1.5, 3, 92.0, 93.0),  # +1.5 at its 200 params; worst 92.0 > plain best 91.5
            row("relaxed-r4-w0.25", 200, 1.5, 3, 91.2, 92.8),  # +1.0 but its worst seed is under the plain best
            row("kdna-w0.25", 1000, 1.9, 1, 93.0, 93.0),  # beyond the plain curve in parameters
            row("condconv-k4-w0.125", 150, 1.2, 3, 90.0, 90.0)]
    verdicts = judged(rows)
    replace = verdicts["replace-w0.25"]
    assert replace["params"]["gain"] == pytest.approx(1.5) and replace["params"]["met"]
    assert replace["latency"]["A"]["met"] and replace["peers"]["A"]["met"] and not replace["provisional"]
    assert replace["peers"]["A"]["best_peer"] == "condconv-k4-w0.125"
    assert replace["peers"]["A"]["missing"] == ["dyconv", "odconv"]
    relaxed = verdicts["relaxed-r4-w0.25"]["params"]
    assert relaxed["gain"] == pytest.approx(1.0) and not relaxed["disjoint"] and not relaxed["met"]
    assert relaxed["outcome"] == common.TIE
    kdna = verdicts["kdna-w0.25"]
    assert kdna["params"] is None and kdna["provisional"] and kdna["latency"]["A"]["gain"] == pytest.approx(
        93.0 - (90.0 + 2.0 * math.log(1.9) / math.log(2.0)))
    assert "condconv-k4-w0.125" not in verdicts  # peers are judged through the KernelDNA rows, not on their own

    slow = [row("replace-w0.375", 300, 2.5, 3, 90.8, 91.4), row("kdna-w0.375", 300, 2.5, 3, 93.0, 93.6),
            row("relaxed-r4-w0.375", 300, 2.5, 3, 91.0, 91.6)]  # overlaps plain-w0.25's seeds: not dominated
    beyond = judged(rows + slow)
    assert beyond["replace-w0.375"]["latency"]["A"] == {"gain": None, "outcome": common.BELOW, "met": False,
                                                         "dominated_by": "plain-w0.25"}
    assert beyond["relaxed-r4-w0.375"]["latency"]["A"] is None
    assert beyond["kdna-w0.375"]["latency"]["A"] is None  # slower and more accurate: nothing to read it against
    assert ("missed (outside the plain curve, but `plain-w0.25` is faster and better on every seed)"
            in frontier_verdicts.targets_text(list(beyond.values()), seeds=3))
    text = frontier_verdicts.targets_text(list(verdicts.values()), seeds=3)
    assert "**met** (+1.50, ranges disjoint)" in text
    assert "not met: tie, seed ranges overlap (+1.00)" in text
    assert "not judged (outside the plain curve)" in text and "1 (provisional)" in text
    assert "**met** so far (+1.33 vs condconv-k4-w0.125 -0.53; no dyconv, odconv yet)" in text

    # A second CPU where DY-Conv (beyond A's plain curve at 3.0 ms) runs at 1.0 ms and replace mode slower
    # (1.9 ms): the latency targets are judged on each CPU, and they can disagree.
    dy = row("dyconv-k4-w0.125", 150, 3.0, 3, 91.0, 91.0)
    b = {"cpu": "B", "rows": {**{r["row"]: {"latency_b1_ms": r["latency_b1_ms"]} for r in rows},
                              "replace-w0.25": {"latency_b1_ms": 1.9}, dy["row"]: {"latency_b1_ms": 1.0}}}
    both = judged(rows + [dy], b)["replace-w0.25"]
    assert list(both["latency"]) == ["A", "B"] and both["peers"]["A"]["met"] and not both["peers"]["B"]["met"]
    assert both["latency"]["B"]["gain"] == pytest.approx(92.5 - (90.0 + 2.0 * math.log(1.9) / math.log(2.0)))
    # on B its seeds [92.0, 93.0] overlap the plain curve's [91.35, 92.35] there: +0.65 on the mean is a tie
    assert both["latency"]["B"]["outcome"] == common.TIE and both["peers"]["B"]["outcome"] == common.TIE
    both_text = frontier_verdicts.targets_text([both], seeds=3)
    assert "A: **met** (+1.33)<br>B: not met: tie, seed ranges overlap (+0.65)" in both_text
    assert ("A: **met** so far (+1.33 vs condconv-k4-w0.125 -0.53; no dyconv, odconv yet)<br>"
            "B: not met: tie, seed ranges overlap (+0.65 vs dyconv-k4-w0.125 +1.00; no odconv yet)") in both_text

    # a peer beaten on the mean but not on every seed: the row's claim over it is a tie, never "met"
    close = row("condconv-k4-w0.125", 150, 1.2, 3, 90.0, 91.5)
    tied = judged([r for r in rows if r["kind"] != "condconv"] + [close])["replace-w0.25"]["peers"]["A"]
    assert tied["gain"] > tied["best_peer_gain"] and tied["outcome"] == common.TIE and not tied["met"]

    thin = [dict(r, seeds=[0]) if r["row"] == "plain-w0.25" else r for r in rows]
    assert next(iter(judged(thin).values()))["provisional"]  # a plain width it is read against is thin
    assert not next(iter(judged(rows[:4]).values()))["provisional"]
    assert next(iter(judged(rows[:4]).values()))["peers"]["A"] == "no peer row read against the plain curve yet"
    untimed = frontier_verdicts.targets({"rows": rows}, seeds=3)[0]
    assert untimed["latency"] == {}
    assert "pending (not timed yet: `--speed`)" in frontier_verdicts.targets_text([untimed], seeds=3)
    assert frontier_verdicts.targets_text([], seeds=3).endswith("No KernelDNA row has finished a run yet.")


def test_speed_compiles_every_row_or_says_it_did_not(study, tmp_path, monkeypatch):
    """Rows of one class share a forward, and dynamo keeps only recompile_limit graphs per code object: past
    it a row would run uncompiled and be reported as compiled. The eager backend has the same caching rules
    and compiles in a blink."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    rows = ["plain-w0.0625", "plain-w0.125"]  # 2 graphs each (batch 1 and 32): 4 on one class's forward

    def speed_modes(limit):
        torch._dynamo.reset()
        args = study.parse_args(tiny(tmp_path / str(limit), rows, "--speed", "--speed-rounds", "1",
                                     "--speed-repeat", "5"))
        with torch._dynamo.config.patch(recompile_limit=limit):
            frontier_speed.speed(args)
        with open(frontier_speed.speed_path(args.out, provenance()["machine"]["cpu"])) as f:
            return {name: r["mode"] for name, r in json.load(f)["rows"].items()}

    assert speed_modes(limit=2) == {row: "compiled" for row in rows}  # each row traced: its own forward
    starved = speed_modes(limit=1)  # room for one graph per row, and each needs two: the fallback is named
    assert all(mode.startswith("eager (compile failed: FailOnRecompileLimitHit") for mode in starved.values())
    torch._dynamo.reset()


def test_timings_per_cpu_newest_first_with_discarded_entries_left_out(study, tmp_path, monkeypatch):
    def write(cpu, date, rows):
        path = frontier_speed.speed_path(str(tmp_path), cpu)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"rows": {r: {"latency_b1_ms": ms} for r, ms in rows.items()},
                       "provenance": {"machine": {"cpu": cpu}, "date_utc": date}}, f)

    write("Old CPU(R) 9", "2026-12-01 10:00:00", {"plain-w0.25": 2.0, "plain-w0.5": 9.0})
    write("New CPU", "2026-12-06 10:00:00", {"plain-w0.25": 1.0, "plain-w0.5": 4.0})
    monkeypatch.setattr(frontier_speed, "DISCARDED_TIMINGS",
                        {("speed/old-cpu-r-9.json", "plain-w0.5"): "ran uncompiled"})
    timings = frontier_speed.load_timings(str(tmp_path))
    assert [t["cpu"] for t in timings] == ["New CPU", "Old CPU(R) 9"]
    assert timings[1]["rows"] == {"plain-w0.25": {"latency_b1_ms": 2.0}}
    assert timings[1]["discarded"] == {"plain-w0.5": "ran uncompiled"} and timings[0]["discarded"] == {}
    summary = {"trained_on": {}, "timings": timings}
    assert ("Left out: `plain-w0.5` in `speed/old-cpu-r-9.json`, which ran uncompiled"
            in frontier_verdicts.machines_text(summary))

