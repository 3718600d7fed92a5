"""The rows of the frontier study (bench.frontier.rows) are zoo names with create_model options (no grammar of names): each builds
through create_model, and the committed records, keyed by the row names, agree with what the rows build."""
from __future__ import annotations

import json
import os

import pytest

from kdna_fx.models import create_model, is_model

from bench import common
from bench.frontier import rows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rows_are_zoo_names_with_options_and_match_the_committed_records():
    """Every row is create_model(zoo name, options): its spec rebuilds it, and its parameter count is the one in
    the committed records (bench/results/frontier/runs), which are keyed by the row names."""
    root = os.path.join(common.REPO, "bench", "results", "frontier", "runs")
    for name in rows.PRESETS["frontier"]["rows"] + rows.PRESETS["short"]["rows"]:
        row = rows.Row.of(name)
        assert is_model(row.model) and row.model.startswith("resnet18.") and row.kind in rows.KINDS
        spec = dict(row.spec())
        assert spec.pop("row") == name
        model = create_model(spec.pop("name"), **spec)
        params = rows.n_params(model)
        assert params == rows.n_params(rows.build(row))
        for seed_file in sorted(os.listdir(os.path.join(root, name))) if os.path.isdir(os.path.join(root, name)) else []:
            with open(os.path.join(root, name, seed_file)) as f:
                recorded = json.load(f)
            assert (recorded["params"], recorded["kind"], recorded["label"]) == (params, row.kind, row.label), name


def test_a_row_is_checked_when_defined():
    with pytest.raises(ValueError, match="does not take"):
        rows.define("relaxed-x", "resnet18.replace", width=0.25, rank=4)  # rank is the relaxed tag's option
    with pytest.raises(ValueError, match="with a width"):
        rows.define("plain-x", "resnet18.plain")
    with pytest.raises(ValueError, match="names its kernels"):
        rows.define("odconv-x", "resnet18.odconv", width=0.25)
    assert "relaxed-x" not in rows.ROW_TABLE
