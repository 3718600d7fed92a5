"""`kdna convert` end to end on a tiny run (a tiny IDX data set, so it never skips), and its bad inputs."""
from __future__ import annotations

import json
import os

import pytest
import torch

import kdna_fx
from kdna_fx.testing import write_tiny_fashion_mnist
from kdna_fx.cli import main
from kdna_fx.cli.convert import reload_hint

# Tier integration: make test-fast leaves it out (kdna train then kdna convert end to end).
# One xdist worker runs the whole file (make test: -n 2 --dist loadgroup): its tests share a cached build.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_convert_command")]



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    data = str(root / "fmnist")
    write_tiny_fashion_mnist(data, n_train=64, n_test=32)
    run_dir = str(root / "run")
    assert main(["train", "--model", "resnet18", "--width", "0.125", "--epochs", "1", "--batch-size", "16",
                 "--data", data, "--run-dir", run_dir, "--no-progress", "--limit-steps", "2"]) == 0
    return root, data, run_dir


def test_convert_a_run_end_to_end(run, capsys):
    root, data, run_dir = run
    out = str(root / "converted.safetensors")
    assert main(["convert", run_dir, "--calib-images", "16", "--steps", "3", "--val-images", "0", "--rank", "2",
                 "--data", data, "--out", out, "--no-progress"]) == 0
    report = json.loads((root / "converted.json").read_text())
    assert set(report["steps"]) == {"original", "converted", "calibrated"}
    assert report["steps"]["original"]["agreement"] == 1.0
    assert report["params"]["converted"] < report["params"]["original"]
    markdown = (root / "converted.md").read_text()
    assert "top-1 %" in markdown and "Command: `kdna convert " in markdown and "Versions: " in markdown
    # A zoo model carries its ModelSpec into the file: the printed hint is the one that works, without a model.
    assert "(reload: kdna_fx.load(path))" in capsys.readouterr().out
    # and the input it was calibrated on, which kdna export then uses (Fashion-MNIST: 1 x 28 x 28)
    from kdna_fx.source import saved_spec

    assert (saved_spec(out).in_chans, saved_spec(out).image_size) == (1, 28)
    assert kdna_fx.models.spec_of(kdna_fx.load(out)).image_size == 28
    for loaded in (kdna_fx.load(out), kdna_fx.load(out, kdna_fx.models.create_model(
            "resnet18", num_classes=10, in_chans=1, small_stem=True, width=0.125))):
        assert kdna_fx.plan_of(loaded).families and kdna_fx.datamodel.record_of(loaded).init == "trained"


def test_the_reload_hint_follows_the_model_spec():
    stamped = kdna_fx.models.create_model("resnet18", num_classes=10, width=0.125)
    assert reload_hint(stamped, "resnet18") == "kdna_fx.load(path)"
    assert reload_hint(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), "MyNet") == "kdna_fx.load(path, <fresh MyNet>)"


def test_convert_a_state_dict_file(run, tmp_path):
    _, data, run_dir = run
    from kdna_fx.train import read_checkpoint

    state = read_checkpoint(os.path.join(run_dir, "last.pt"))["model"]
    torch.save(state, tmp_path / "weights.pt")
    out = tmp_path / "w.safetensors"
    assert main(["convert", str(tmp_path / "weights.pt"), "--model", "resnet18", "--width", "0.125",
                 "--small-stem", "--calib-images", "8", "--steps", "2", "--val-images", "0", "--data", data,
                 "--out", str(out), "--no-progress"]) == 0
    assert out.exists()


def test_bad_inputs_are_clear_and_leave_nothing_at_out(run, tmp_path, capsys):
    _, data, run_dir = run
    state = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, state)
    out = tmp_path / "never.safetensors"
    cases = [
        ([str(state), "--data", data], "needs --model"),
        ([str(state), "--model", "resnet18", "--width", "0.125", "--small-stem", "--data", data], "do not fit"),
        ([run_dir, "--calib-images", "0", "--data", data], "--calib-images"),
        ([run_dir, "--model", "resnet50", "--data", data], "differs from the run's model"),
        ([str(tmp_path / "nowhere"), "--data", data], "neither a `kdna train` run directory"),
    ]
    for argv, needle in cases:
        assert main(["convert", *argv, "--out", str(out), "--no-progress"]) == 2, argv
        assert needle in capsys.readouterr().err, needle
    assert not out.exists() and not (tmp_path / "never.safetensors.tmp").exists()
