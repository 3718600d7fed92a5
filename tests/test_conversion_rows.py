"""The conversion study's rows are a table of specs (bench/conversion_rows.py), not a grammar: every row name its
committed records are filed under is a key of the table, a probe is its arm with CalibrationConfig fields on top,
the protocol-3 plans only name rows of the table, and the report rebuilds the committed summary from the records."""
from __future__ import annotations

import json
import os

import pytest
import torch

import kdna_fx
from kdna_fx.calibration import CalibrationConfig
from kdna_fx.testing import TinyResNet, blob_task

from bench import common
from bench import conversion_report as report
from bench import conversion_rows as table

RESULTS = os.path.join(common.REPO, "bench", "results")


def recorded_rows() -> set[str]:
    """Every row name under the conversion and CKA studies' runs folders (every protocol)."""
    names = set()
    for study in ("conversion", "cka"):
        for root, _, files in os.walk(os.path.join(RESULTS, study)):
            for name in files:
                if name.endswith(".json") and os.sep + "runs" in root:
                    with open(os.path.join(root, name)) as f:
                        record = json.load(f)
                    if isinstance(record, dict) and "row" in record:
                        names.add(record["row"])
    return names


def test_every_recorded_row_is_a_key_of_the_table():
    names = recorded_rows()
    assert {"kdna-r4", "prune@kdna-r4:lr=0.01", "kdna-r4-pairs-random1", "prune30+kdna-r4"} <= names
    assert sorted(names - set(table.ROWS)) == []


def test_a_probe_is_its_arm_with_calibration_fields_on_top():
    row = table.ROWS["prune@kdna-r4:lr=0.01,weight_lr=0.003"]
    assert (row.method, row.arm, row.matched_to) == ("prune", "prune@kdna-r4", "kdna-r4")
    assert dict(row.probe) == {"lr": 0.01, "weight_lr": 0.003}
    assert table.ROWS["kdna-r4:train=all"].probe == {"train": "all"}
    gram = table.ROWS["kdna-r8:lr=0.003,layer_loss=gram"]
    assert (gram.arm, gram.rank, dict(gram.probe)) == ("kdna-r8", 8, {"lr": 0.003, "layer_loss": "gram"})
    assert table.ROWS["kdna-r4-adapters-logits"].calibration == {"train": "adapters", "features": 0.0}
    assert table.arm("kdna-r4:weight_lr=0.003") == "kdna-r4" and table.arm("not-a-row") == "not-a-row"
    assert table.probe_name("kdna-r4", "", "features=0") == "kdna-r4:features=0"
    assert table.probe_name("svd@kdna-r4", "") == "svd@kdna-r4"


def test_every_name_a_plan_can_run_is_in_the_table():
    for arm, probes in table.GRID.items():
        for probe, fields in probes.items():
            for extra, more in table.EXTRAS.items():
                for row in (arm, table.RANK8[arm]):
                    name = table.probe_name(row, probe, extra)
                    assert table.ROWS[name].arm == row and table.ROWS[name].probe == {**fields, **more}
    for mine, other in table.HEADLINE:
        assert mine in table.ROWS and other in table.ROWS
    assert all(name in table.ROWS for name in table.STUDY_ROWS + table.ABLATION)


def test_an_unknown_row_names_the_table():
    with pytest.raises(SystemExit, match="unknown row 'kdna-r5'.*kdna-r4"):
        table.recipe("kdna-r5", None, {"name": "resnet18"}, None, CalibrationConfig(), 1e-3)


def test_the_report_rebuilds_the_committed_summary_from_the_records():
    # bench/results/conversion/conversion_study.json was written by the former regex-row code from the same runs.
    out = os.path.join(RESULTS, "conversion")
    with open(os.path.join(out, "conversion_study.json")) as f:
        committed = json.load(f)
    summary = report.summarise(out)
    assert summary["rows"] == committed["rows"] and summary["verdicts"] == committed["verdicts"]


@pytest.mark.integration  # calibrates a student per row kind
def test_a_recipe_takes_convert_s_steps_for_any_student():
    """A plain student made elsewhere (train="all": it has no adapters) and a transform go through the same
    steps: made, calibrated, fine-tuned, scored after each; the original row is only scored."""
    with torch.random.fork_rng():
        model, calib_x, test_x, test_y = blob_task()
        labelled = torch.utils.data.TensorDataset(test_x[:64], test_y[:64])
        finetune = kdna_fx.train.TrainConfig(epochs=1, batch_size=32, lr=0.01, warmup_epochs=0, amp="none",
                                             progress=False, limit_steps=1)
        quiet = CalibrationConfig(steps=3, progress=False)
        evaluate = {"held": [(test_x, test_y)]}
        plain = TinyResNet(width=4, in_chans=1, num_classes=5)
        made = table.Recipe(lambda: plain, quiet.replace(train="all")).convert(
            model, calib_x, finetune=labelled, finetune_config=finetune, evaluate=evaluate)
        assert made.model is plain and list(made.stages) == ["converted", "calibrated", "fine-tuned"]
        assert made.calibration.config.train == "all" and made.params["converted"] < made.params["original"]
        shared = table.Recipe(lambda: kdna_fx.transform(model, init="trained"), quiet).convert(model, calib_x,
                                                                                             evaluate=evaluate)
        held = {stage: v["held"] for stage, v in shared.stages.items()}
        assert list(held) == ["converted", "calibrated"] and kdna_fx.plan_of(shared.model).families
        assert all(0 <= v["agreement"] <= 1 and shared.stages[s]["seconds"] > 0 for s, v in held.items())
        original = table.Recipe(lambda: model, None).convert(model, calib_x, evaluate=evaluate)
        assert list(original.stages) == ["converted"] and original.stages["converted"]["held"]["agreement"] == 1.0


def test_a_folder_is_judged_unless_it_only_chooses():
    """The validation grid (calibration only) chooses between probes and judges nothing; the headline (each arm
    once, with its winning probe) and the loss-form control are judged, like with like. The committed protocol-3
    folders are one of each."""
    p3 = os.path.join(RESULTS, "conversion", "protocol3")
    assert report.is_grid(report.summarise(os.path.join(p3, "grid")))
    headline = report.summarise(p3)
    assert not report.is_grid(headline)
    judged = {(v["row"], v["baseline"]) for v in headline["verdicts"] if "calibrated" in v}
    assert {("kdna-r4:weight_lr=0.003", "prune@kdna-r4"), ("kdna-r8:weight_lr=0.003", "svd@kdna-r8")} <= judged
    loss_form = report.summarise(os.path.join(p3, "loss_form"))
    assert not report.is_grid(loss_form)
    assert {(v["row"], v["baseline"]) for v in loss_form["verdicts"]} == {
        ("kdna-r4:weight_lr=0.003,layer_loss=gram", "prune@kdna-r4:layer_loss=gram"),
        ("kdna-r4:weight_lr=0.003,layer_loss=gram", "svd@kdna-r4:layer_loss=gram")}
    assert table.extra("prune@kdna-r4:features=0") == "features=0" and table.extra("kdna-r4:lr=0.003") == ""
