"""bench.common, the studies' shared module: the significance rules, the validation split, provenance from
committed code only (kept by a report-only rewrite), atomic records, the matched-parameter baselines (pruning,
factorisation) and machine labels."""
from __future__ import annotations

import os
import re

import pytest
import torch

import kdna_fx
from kdna_fx import KDNAConfig
from kdna_fx.testing import TinyResNet

# Tier integration, as when these checks lived in tests/test_conversion.py (prunes and factorises models).
pytestmark = pytest.mark.integration


def test_one_significance_rule():
    from bench.common import ABOVE, BELOW, TIE, compare

    assert compare([92.0, 92.4, 92.1], [91.0, 91.9]) == ABOVE
    assert compare([91.0, 91.9], [92.0, 92.4]) == BELOW
    assert compare([91.0, 92.0], [91.5, 91.6]) == TIE  # a better mean inside overlapping ranges decides nothing
    assert compare([92.0], [92.0]) == TIE  # touching is not disjoint
    with pytest.raises(ValueError, match="no values"):
        compare([], [1.0])


def test_validation_split_is_fixed_and_disjoint():
    from bench.common import validation_split

    pool, val = validation_split(100, 10, seed=0)
    assert len(val) == 10 and len(pool) == 90 and not set(pool) & set(val) and set(pool) | set(val) == set(range(100))
    assert validation_split(100, 10, seed=0) == (pool, val)  # every seed of a study holds out the same images
    with pytest.raises(ValueError, match="n_val"):
        validation_split(10, 10)


def test_results_only_from_committed_code(monkeypatch):
    from bench import common
    from kdna_fx import timing

    monkeypatch.setattr(timing, "git_commit", lambda **_: {"commit": "abc", "dirty": True})
    with pytest.raises(common.DirtyTreeError, match="--force-dirty"):
        common.run_provenance()
    forced = common.run_provenance(force_dirty=True)
    assert forced["git"] == {"commit": "abc", "dirty": True}  # a forced record says so
    machine = forced["machine"]
    assert machine["cpu"] and len(machine["host_id"]) == 10  # machines named by CPU model and a host id
    monkeypatch.setattr(timing, "git_commit", lambda **_: {"commit": "abc", "dirty": False})
    assert common.run_provenance()["git"]["dirty"] is False


def test_save_json_never_leaves_half_a_record(tmp_path, monkeypatch):
    import json

    from bench.common import write_json

    path = str(tmp_path / "runs" / "r.json")
    write_json(path, {"a": 1})
    assert json.loads(open(path).read()) == {"a": 1}

    def broken(payload, f, **_):
        f.write('{"half": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", broken)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(open(path).read()) == {"a": 1}


def test_matched_parameter_baselines(dtype, tol):
    from bench.common import factorise, matched, n_params, prune, shared_convs

    torch.manual_seed(0)
    model = TinyResNet(width=4).eval()  # distinct random kernels: the baselines only count and factorise them
    target = n_params(kdna_fx.transform(model, init="trained"))
    pruned, ratio = matched(lambda r: prune(model, r, torch.randn(2, 3, 12, 12)), target, 0.0, 0.9)
    assert 0 < ratio < 0.9 and abs(n_params(pruned) - target) < 0.15 * target  # width 4: coarse steps
    names = shared_convs(model, KDNAConfig())
    assert names and all(isinstance(model.get_submodule(n), torch.nn.Conv2d) for n in names)
    x = torch.randn(2, 3, 12, 12)
    full = factorise(model, names, 1.0)  # full rank saves nothing: left alone, same outputs
    torch.testing.assert_close(full.eval()(x), model(x), **tol)
    small, fraction = matched(lambda f: factorise(model, names, f), target, 0.02, 1.0)
    assert n_params(small) < n_params(model) and 0.02 <= fraction <= 1.0


def test_pruning_works_under_no_grad():
    # Torch-Pruning asserts grad mode while it traces; the prune-then-share row called it under no_grad and
    # failed (protocol 2's first run of prune30+kdna-r4).
    pytest.importorskip("torch_pruning")
    from bench.common import prune

    model = TinyResNet()
    with torch.no_grad():
        pruned = prune(model, 0.3, torch.randn(2, 3, 16, 16))
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_the_paired_rule_judges_only_from_three_pairs():
    from bench.common import ABOVE, BELOW, NOT_DISTINGUISHABLE, paired, paired_cell

    # the seed ranges overlap, yet a trails b by about 0.3 on every seed: the pairs decide
    a, b = {0: 90.98, 1: 90.61, 2: 90.36}, {0: 91.30, 1: 90.88, 2: 90.70}
    p = paired(a, b)
    assert p["n"] == 3 and p["outcome"] == BELOW and p["interval"][1] < 0
    assert paired(b, a)["outcome"] == ABOVE
    assert paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 1.5, 2: 2.5})["outcome"] == NOT_DISTINGUISHABLE
    assert "not distinguishable at 3 seeds" in paired_cell(paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 1.5, 2: 2.5}))
    # only the seeds both arms ran are paired; two pairs get an interval but no verdict, one pair neither
    two = paired({0: 2.0, 1: 3.0, 5: 9.0}, {0: 1.0, 1: 1.0})
    assert two["n"] == 2 and "outcome" not in two and "interval" in two and "not judged" in paired_cell(two)
    one = paired({0: 2.0}, {0: 1.0})
    assert one["mean"] == 1.0 and "interval" not in one and "outcome" not in one
    assert paired_cell(paired({}, {0: 1.0})) == "-"


def test_the_paired_interval_is_the_t_interval():
    import statistics

    from bench.common import paired

    d = [0.3, 0.1, 0.5, 0.2]
    p = paired({i: v for i, v in enumerate(d)}, {i: 0.0 for i in range(4)})
    half = 3.182446305284263 * statistics.stdev(d) / 2  # t(0.975, 3) * s / sqrt(4)
    assert p["interval"] == pytest.approx([statistics.mean(d) - half, statistics.mean(d) + half])


def test_machine_labels_tell_apart_machines_with_one_cpu_name():
    from bench.common import machine_label

    a = {"cpu": "AMD EPYC", "platform": "Linux-6.18.44-fc-v782-x86_64-with-glibc2.36"}
    b = {"cpu": "AMD EPYC", "platform": "Linux-6.18.44-fc-v1272-x86_64-with-glibc2.36"}
    assert machine_label(a) == "AMD EPYC [6.18.44-fc-v782]" and machine_label(a) != machine_label(b)
    assert machine_label({"cpu": "x"}) == "x [platform not recorded]"


def test_a_report_only_rewrite_keeps_the_run_s_provenance_and_names_its_own_commit(tmp_path, monkeypatch):
    from bench import common
    from kdna_fx import timing

    stem = str(tmp_path / "study")
    monkeypatch.setattr(timing, "git_commit", lambda **_: {"commit": "new", "dirty": False})
    fresh = common.report_provenance(stem, ["-m", "bench.x", "--report"], out=str(tmp_path), report_only=True)
    assert fresh["git"]["commit"] == "new" and fresh["command"].endswith("-m bench.x --report")  # nothing stored yet
    stored = {"command": "python -m bench.x --seeds 0 1 2", "machine": {"cpu": "the one that ran"},
              "git": {"commit": "old", "dirty": False}}
    common.write_json(f"{stem}.json", {"rows": [], "provenance": stored})
    rewritten = common.report_provenance(stem, ["-m", "bench.x", "--report"], out=str(tmp_path), report_only=True)
    assert {k: rewritten[k] for k in stored} == stored  # the run's command, machine and commit stay
    assert rewritten["report"]["git"]["commit"] == "new"  # and the code that rewrote the tables is named
    assert rewritten["report"]["command"].endswith("-m bench.x --report")
    after_a_run = common.report_provenance(stem, ["-m", "bench.x"], out=str(tmp_path), report_only=False)
    assert after_a_run["git"]["commit"] == "new"  # a run's report names the run's commit
    monkeypatch.setattr(timing, "git_commit", lambda **_: {"commit": "new", "dirty": True})
    for report_only in (False, True):  # and only committed code writes into bench/results, a rewrite included
        with pytest.raises(common.DirtyTreeError):
            common.report_provenance(stem, None, out=os.path.join(common.REPO, "bench", "results"),
                                     report_only=report_only)


def test_suite_timing_reads_pytest_s_summary_and_times_real_make_targets():
    from bench import common, suite_timing

    lines = "....\n1421 passed, 8 skipped, 27 warnings in 394.96s (0:06:34)\n"
    (match,) = suite_timing.SUMMARY.finditer(lines)
    assert float(match["seconds"]) == 394.96 and match["line"].startswith("1421 passed, 8 skipped")
    assert not list(suite_timing.SUMMARY.finditer("no tests ran"))
    with open(os.path.join(common.REPO, "Makefile")) as f:
        targets = {line.split(":")[0] for line in f if re.match(r"^[a-z-]+:", line)}
    assert set(suite_timing.TARGETS) <= targets and set(suite_timing.GOALS) <= set(suite_timing.TARGETS)


def test_suite_timing_measures_each_commands_own_memory():
    """The peaks are the command's (its own children), not the largest of every command timed before it; the
    memory held by all its processes together is at least its largest one's share."""
    import subprocess
    import sys

    from bench import suite_timing

    def peak_kib(megabytes: int) -> int:
        grow = f"import time; x = bytearray({megabytes} * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(1.0)"
        done = subprocess.run([sys.executable, "-c", suite_timing._UNDER_MEASURE, "0.1", sys.executable, "-c", grow],
                              capture_output=True, text=True, check=True)
        largest, held = re.search(rf"^{suite_timing.PEAK} (\d+) (\d+)$", done.stderr, re.M).groups()
        return int(largest), int(held)

    (big, big_held), (small, small_held) = peak_kib(300), peak_kib(20)
    assert big > 300 * 1024 > small
    assert big_held > 300 * 1024 > small_held > 0
