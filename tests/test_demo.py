"""`kdna demo`: its flags, run small, and the accuracy part read from the frontier study's committed record."""
from __future__ import annotations

import json

import pytest

from kdna_fx.cli import main
from kdna_fx.cli.demo import FRONTIER, frontier_summary


@pytest.mark.integration
def test_demo_runs_small_and_shows_both_models_side_by_side(capsys):
    pytest.importorskip("onnxruntime")
    assert main(["demo", "--no-compile", "--no-train", "--image-size", "32", "--batch-size", "2"]) in (0, None)
    out = capsys.readouterr().out
    assert "11,689,512" in out and "5,741,017" in out  # ResNet-18 and its KernelDNA form
    assert "kdna_fx.save file, MB  46.8" in out and "onnx deploy file, MB   46.8" in out
    assert "batch 2: ms per call" in out and "batch 8" not in out
    assert "eager: the original and kdna_fx.fold's model, 32x32 px" in out
    assert "frontier" not in out  # --no-train leaves the accuracy part out


def test_the_accuracy_part_reads_the_committed_record(tmp_path):
    with open(FRONTIER) as f:
        record = json.load(f)
    target = next(t for t in record["targets"] if t["row"] == "kdna-w0.25")
    kdna = target["params"]
    text = frontier_summary()
    shown = f"{target['seeds']} seeds: not judged" if target["provisional"] else kdna["outcome"]
    assert f"{kdna['gain']:+.2f} ({shown})" in text and record["provenance"]["command"] in text
    # the record's verdict at equal parameters; fewer than 3 seeds are reported, never judged
    assert ("not judged" in text) == target["provisional"]
    assert ("seed ranges overlap" in text) == (kdna["outcome"] == "tie" and not target["provisional"])
    target["provisional"] = False

    # the numbers come from the file, not from the code: another record, another summary
    kdna.update(gain=1.5, outcome="above")
    changed = tmp_path / "frontier.json"
    changed.write_text(json.dumps(record))
    text = frontier_summary(str(changed))
    assert "+1.50 (above)" in text and "seed ranges overlap" not in text
    assert "no frontier record" in frontier_summary(str(tmp_path / "missing.json"))
