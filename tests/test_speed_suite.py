"""bench/speed.py and its report (bench/speed_report.py): the targets judged (checked on hand-made numbers) and a
tiny run end to end."""
from __future__ import annotations

import json
import os

import pytest
import torch

from bench import speed_report

# Tier bench: a smoke run of a bench/ script (make test-all) (runs bench/speed.py end to end).
# One xdist worker runs the whole file (make test: -n 2 --dist loadgroup): its tests share a cached build.
pytestmark = [pytest.mark.bench, pytest.mark.xdist_group("test_speed_suite")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def speed():
    from bench import speed as module  # `python -m pytest` runs from the repository root

    before = torch.get_num_threads()
    yield module
    torch.set_num_threads(before)


def _timing(ips: dict[str, float]) -> dict[str, dict[str, float]]:
    return {name: {"images_per_s": v, "median_s": 1 / v, "iqr_rel": 0.0} for name, v in ips.items()}


def test_targets_from_hand_made_numbers(speed):
    rows = {"base": {"role": "baseline", "macs": 100, "graphs_dynamic": 2},
            "replace": {"role": "replace", "macs": 100, "graphs_dynamic": 2},
            "folded": {"role": "folded", "macs": 100, "graphs_dynamic": 3},
            "ref": {"role": "reference", "macs": 125},
            "ODConv 1x": {"role": "peer", "macs": 101}}
    payload = {"rows": rows, "timings": {
        "eager": {"1": _timing({"base": 10, "replace": 8, "folded": 9, "ref": 7, "ODConv 1x": 6}),
                  "32": _timing({"base": 90, "replace": 80, "folded": 85, "ref": 70, "ODConv 1x": 20})},
        "freezing": {"1": _timing({"base": 10, "replace": 9.6, "folded": 9.8, "ref": 7.4, "ODConv 1x": 6}),
                     "32": _timing({"base": 100, "replace": 95, "folded": 96, "ref": 77, "ODConv 1x": 30})}},
        "train": {"batch": 32, "train": {"base": {"eager": {"median_s": 2.0}, "inductor": {"median_s": 1.6}}}}}
    got = {(t[0], t[1], t[2]): (round(t[3], 4), t[5]) for t in speed_report.targets(payload)}
    # Replace mode is judged by its better form (folded here), against the baseline in the same compiled mode.
    assert got["replace mode (folded) / base", "freezing", "1"] == (0.98, True)
    assert got["replace mode (folded) / base", "freezing", "32"] == (0.96, False)
    # MAC bound: the baseline's throughput x 100 / 125 = 8 at batch 1, 80 at batch 32.
    assert got["ref / MAC bound", "freezing", "1"] == (round(7.4 / 8, 4), False)
    assert got["ref / MAC bound", "freezing", "32"] == (round(77 / 80, 4), True)
    # KernelDNA vs ODConv 1x: 1.5x needed at batch 1, 3x at batch 32; eager rows are judged too.
    assert got["KernelDNA (folded) / ODConv 1x", "freezing", "1"] == (round(9.8 / 6, 4), True)
    assert got["KernelDNA (folded) / ODConv 1x", "freezing", "32"] == (round(96 / 30, 4), True)
    assert got["KernelDNA (folded) / ODConv 1x", "eager", "1"] == (1.5, True)
    # Graphs with a dynamic batch are counted against the baseline's own.
    assert got["replace: graphs beyond base's 2 (dynamic=True)", "inductor", "1/32"] == (0, True)
    assert got["folded: graphs beyond base's 2 (dynamic=True)", "inductor", "1/32"] == (1, False)
    assert got["base train step: eager / compiled time", "inductor", 32] == (1.25, True)
    assert not any(t[1] == "eager" and "replace mode" in t[0] for t in speed_report.targets(payload))  # compiled only


def test_tiny_run_writes_json_markdown_and_plot(speed, tmp_path):
    out = tmp_path / "speed"
    speed.main(["--groups", "mobilenet_v2", "--modes", "eager", "--batches", "1", "2", "--image-size", "16",
                "--repeat", "1", "--rounds", "1", "--threads", "1", "--out", str(out)])
    with open(out / "mobilenet_v2_cpu.json") as f:
        payload = json.load(f)
    assert set(payload["rows"]) == {"mobilenet_v2", "replace", "replace folded"}
    assert payload["rows"]["replace"]["params"] < payload["rows"]["mobilenet_v2"]["params"]
    assert set(payload["timings"]["eager"]) == {"1", "2"}
    assert all(t["images_per_s"] > 0 for t in payload["timings"]["eager"]["2"].values())
    assert payload["rows"]["replace"]["peak_bytes"]["eager"] > 0  # the profiler saw the activations
    assert payload["provenance"]["command"].endswith(f"--out {out}")
    md = (out / "speed_cpu.md").read_text()
    assert "## mobilenet_v2: 3x16x16" in md and "KernelDNA (replace folded) / ODConv 1x" not in md
    assert (out / "speed_cpu.png").stat().st_size > 0


def test_a_run_leaves_the_callers_dynamo_config_alone(speed, tmp_path):
    with torch._dynamo.config.patch(recompile_limit=5, fail_on_recompile_limit_hit=False):
        speed.main(["--groups", "mobilenet_v2", "--modes", "eager", "--batches", "1", "--image-size", "16",
                    "--repeat", "1", "--rounds", "1", "--threads", "1", "--out", str(tmp_path / "speed")])
        assert torch._dynamo.config.recompile_limit == 5 and not torch._dynamo.config.fail_on_recompile_limit_hit


def test_bf16_targets_from_hand_made_numbers(speed):
    rows = {"base": {"role": "baseline", "macs": 100}, "replace": {"role": "replace", "macs": 100},
            "folded": {"role": "folded", "macs": 100}, "ODConv 1x": {"role": "peer", "macs": 101}}
    bf16 = {"base": 100, "replace": 94, "folded": 96, "ODConv 1x": 30}
    payload = {"rows": rows, "timings": {"freezing": {"32": _timing({"base": 50, "replace": 49, "folded": 48,
                                                                     "ODConv 1x": 15})}},
               "variants": {"batch": 32, "variants": {n: {"fp32": _timing({n: 1})[n], "bf16": _timing({n: v})[n]}
                                                      for n, v in bf16.items()}},
               "train": {"batch": 32, "amp": "bf16", "train": {
                   "base": {"eager": {"median_s": 2.0}, "inductor": {"median_s": 1.0}},
                   "replace": {"eager": {"median_s": 2.0}, "inductor": {"median_s": 1.2}}}}}
    got = {(t[0], t[1], t[2]): (round(t[3], 4), t[5]) for t in speed_report.targets(payload)}
    # bf16 inference: the better of unfolded and folded against the baseline, >= 0.95.
    assert got["replace mode (folded) / base, bf16", "freezing, bf16 autocast", 32] == (0.96, True)
    # bf16 training: the baseline's compiled step time over replace mode's, >= 0.9.
    assert got["replace / base bf16 train step speed", "inductor, bf16 autocast", 32] == (round(1 / 1.2, 4), False)
    # Without bf16 numbers (fp32 training, no variants) there is no bf16 row.
    payload["train"]["amp"] = "none"
    del payload["variants"]
    assert not any("bf16" in t[0] for t in speed_report.targets(payload))


def test_bf16_profile_applies_the_suites_rule_at_every_batch(speed):
    from bench import bf16_profile
    ips = {"1": (20, 19.5, 18), "32": (30, 27, 28)}
    result = {"timings": {b: {f"{n} | {d}": _timing({"x": v * (2 if d == "fp32" else 1)})["x"]
                              for n, v in zip(("resnet18", "replace", "replace folded"), vals) for d in ("fp32", "bf16")}
                          for b, vals in ips.items()}}
    got = {t[2]: (t[0], round(t[3], 4), t[5]) for t in bf16_profile.targets("resnet18", result)}
    assert got == {"1": ("replace mode (replace) / resnet18, bf16", 0.975, True),
                   "32": ("replace mode (replace folded) / resnet18, bf16", round(28 / 30, 4), False)}
    payload = {"cast": "autocast", "models": {"resnet18": result}, "load_before": [1, 1, 1], "load_after": [2, 2, 2],
               "commit": "abc", "provenance": {"command": "x", "date_utc": "d", "versions": {"torch": "t"},
                                               "machine": {"cpu": "c", "cores": 2, "torch_threads": 1}}}
    md = bf16_profile.markdown(payload)
    assert "| replace folded | bf16 | 18.0 (0%) x0.900 | 28.0 (0%) x0.933 |" in md and "**no**" in md
    # The gates' share of op time: a row's gate-like kernels less the baseline's own (its pooling, its classifier).
    result["profile"] = {"32": {"resnet18 | bf16": {"total_s": 1.0, "gate_like_s": 0.01, "table": "t"},
                                "replace | bf16": {"total_s": 1.05, "gate_like_s": 0.0625, "table": "t"}}}
    assert bf16_profile.gate_share("resnet18", result["profile"]["32"]) == {"replace": pytest.approx(0.05)}
    assert "| replace | 5.0% |" in bf16_profile.markdown(payload)
