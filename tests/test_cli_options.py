"""docs/cli.md's options table is true: each option it lists is taken by exactly the commands it names, and every
option of every command is listed (read from each command's --help usage)."""
from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

import kdna_fx.cli as cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _usage_options(command: str) -> set[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main([command, "--help"])
    usage = out.getvalue().split("\n\n")[0]  # argparse's usage block lists every option
    return set(re.findall(r"--[a-z][a-z-]*", usage)) - {"--help"}


def test_the_options_table_is_the_commands_options():
    table = {}
    for line in (ROOT / "docs" / "cli.md").read_text().splitlines():
        match = re.match(r"\| `(--[a-z-]+)` \| .* \| ([a-z, ]+) \|$", line)
        if match:
            table[match.group(1)] = set(match.group(2).split(", "))
    assert "--batch-size" in table and "--out" in table  # the table was read
    actual: dict[str, set[str]] = {}
    for command in cli.COMMANDS:
        for option in _usage_options(command):
            actual.setdefault(option, set()).add(command)
    wrong = {o: (table.get(o), actual.get(o)) for o in table.keys() | actual.keys() if table.get(o) != actual.get(o)}
    assert not wrong, f"docs/cli.md (left) and the parsers (right) disagree: {wrong}"



@pytest.mark.parametrize("command", ["eval", "convert", "cka"])
def test_a_damaged_state_dict_is_one_line_naming_the_fix(command, tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a pickle")
    assert cli.main([command, str(bad), "--model", "resnet18", "--width", "0.25"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torch.save(model.state_dict(), path)" in err
    assert "weights_only" not in err  # torch's advice to load untrusted code is not repeated


def _folder_with_a_text_file(root: pathlib.Path) -> str:
    from PIL import Image

    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / label / f"{i}.png")
    (root / "a" / "notes.png").write_text("not an image")
    return str(root)


def _ultralytics_like_open(monkeypatch) -> None:
    # Ultralytics replaces PIL.Image.open process-wide; on a file Pillow cannot identify its patch imports an
    # optional HEIF plugin and raises ModuleNotFoundError when that is absent (the CI failure of stop 36).
    from PIL import Image, UnidentifiedImageError

    original = Image.open

    def patched_open(fp, *args, **kwargs):
        try:
            return original(fp, *args, **kwargs)
        except UnidentifiedImageError:
            raise ModuleNotFoundError("No module named 'pi_heif'") from None

    monkeypatch.setattr(Image, "open", patched_open)


@pytest.mark.parametrize("opener", ["pillow", "patched by another library"])
def test_a_non_image_in_a_folder_data_set_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, opener):
    if opener != "pillow":
        _ultralytics_like_open(monkeypatch)
    data = _folder_with_a_text_file(tmp_path)
    args = ["cka", "resnet18", "--width", "0.25", "--dataset", "folder", "--data", data, "--image-size",
            "16", "--images", "7", "--batch-size", "4", "--no-progress", "--out-dir", str(tmp_path / "out")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.png" in err and "remove it" in err


@pytest.mark.integration  # a training run whose data loader reads in a worker process
def test_a_non_image_read_in_a_data_loader_worker_is_one_line_too(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    data = _folder_with_a_text_file(tmp_path / "data")
    args = ["train", "--model", "resnet18", "--width", "0.125", "--dataset", "folder", "--data", data,
            "--val-fraction", "0.01", "--image-size", "16", "--epochs", "1", "--batch-size", "6", "--workers", "1",
            "--device", "cpu", "--no-progress", "--run-dir", str(tmp_path / "run")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.png" in err and "remove it" in err


@pytest.mark.integration  # runs kdna eval end to end on Fashion-MNIST
def test_eval_takes_a_state_dict_with_model_and_names_a_converted_model(tmp_path, capsys):
    import json
    import os

    import torch

    import kdna_fx

    if not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"):
        pytest.skip("Fashion-MNIST is not installed (make data)")
    options = dict(num_classes=10, in_chans=1, small_stem=True, width=0.25)
    original = kdna_fx.models.create_model("resnet18", **options)
    torch.save(original.state_dict(), tmp_path / "weights.pt")
    kdna_fx.save(kdna_fx.transform(original), tmp_path / "converted.safetensors")
    common = ["--val-subset", "32", "--batch-size", "16", "--device", "cpu", "--workers", "0", "--no-progress"]
    assert cli.main(["eval", str(tmp_path / "weights.pt"), "--model", "resnet18", "--width", "0.25", "--small-stem",
                     *common, "--out", str(tmp_path / "plain.json")]) == 0
    assert cli.main(["eval", str(tmp_path / "converted.safetensors"), *common,
                     "--out", str(tmp_path / "converted.json")]) == 0
    plain, converted = (json.loads((tmp_path / f"{n}.json").read_text())["model"] for n in ("plain", "converted"))
    assert plain == "resnet18" and converted == "resnet18.plain, converted by kdna_fx.transform"


def test_the_data_options_make_one_data_spec_over_a_runs():
    import argparse

    from kdna_fx.cli.options import data_spec
    from kdna_fx.data import DataSpec

    # a checkpoint of an older kdna_fx kept the data's location under "path"
    run = DataSpec.from_dict({"dataset": "folder", "path": "/old", "image_size": 32, "val_fraction": 0.2,
                              "train_subset": None, "val_subset": 5})
    assert run == DataSpec("folder", "/old", 32, 0.2, None, 5) == DataSpec.from_dict(run.to_dict())
    typed = argparse.Namespace(root="/new", dataset=None, image_size=None)  # only --data given
    assert data_spec(typed, run) == DataSpec("folder", "/new", 32, 0.2, None, 5)
    assert data_spec(typed, run, val_subset=7).val_subset == 7
    assert data_spec(argparse.Namespace()) == DataSpec()  # nothing typed, no run: Fashion-MNIST
