"""The `kdna` command line: dispatch, and how errors reach the user (kdna train/eval end to end: test_train.py)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types

import pytest

import kdna_fx
from kdna_fx import cli
from kdna_fx.errors import KDNAError
from kdna_fx.train import CheckpointError, NonFiniteLossError


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_names_a_function(command):
    module, function = cli.COMMANDS[command][0].split(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_no_module_shadows_the_standard_library():
    assert importlib.util.find_spec("kdna_fx.inspect") is None
    assert importlib.util.find_spec("kdna_fx.cli.plan") is not None


@pytest.fixture
def fake_command(monkeypatch):
    """Registers `kdna fake`, which raises whatever the test puts in ``raising[0]``."""
    raising: list[BaseException] = []
    module = types.ModuleType("kdna_fake_command")

    def main(argv):
        if raising:
            raise raising[0]
        return 0

    module.main = main
    monkeypatch.setitem(sys.modules, "kdna_fake_command", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("kdna_fake_command:main", "a test command"))
    return raising


@pytest.mark.parametrize("error, code", [(KDNAError("no good"), 2), (CheckpointError("no good"), 2),
                                         (NonFiniteLossError("no good"), 3)])
def test_kdna_errors_print_one_line_and_set_the_exit_code(fake_command, capsys, error, code):
    assert cli.main(["fake"]) == 0
    fake_command.append(error)
    assert cli.main(["fake", "--x"]) == code
    captured = capsys.readouterr()
    assert captured.err == "kdna fake: error: no good\n" and captured.out == ""


@pytest.mark.parametrize("bug", [ValueError("a bug"), RuntimeError("a bug"), KeyError("a bug")])
def test_other_exceptions_keep_their_traceback(fake_command, bug):
    fake_command.append(bug)
    with pytest.raises(type(bug), match="a bug"):
        cli.main(["fake"])


def test_help_and_unknown_command(capsys):
    assert cli.main([]) == 0 and cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_plan_command_prints_the_plan(capsys):
    assert cli.main(["plan", "resnet18", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [f["parent"] for f in plan["families"]] == ["layer1.0.conv1", "layer2.0.conv2", "layer3.0.conv2",
                                                      "layer4.0.conv2"]


def test_plan_command_takes_zoo_names_and_prints_a_transformed_models_own_plan(capsys):
    assert cli.main(["plan", "kdna_resnet18", "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert own == kdna_fx.plan_of(kdna_fx.models.create_model("kdna_resnet18")).to_dict()
    assert cli.main(["plan", "mobilenet_v2", "--json"]) == 0  # the zoo's sharing config: its 1x1 convs
    assert json.loads(capsys.readouterr().out)["families"]


def test_plan_command_takes_timm_and_torchvision_names(capsys):
    assert cli.main(["plan", "timm/resnet26d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["families"]
    assert cli.main(["plan", "torchvision/regnet_x_400mf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["families"]


def test_models_command_is_reachable_from_kdna(capsys):
    assert cli.main(["models", "resnet18", "--small"]) == 0
    assert "resnet18" in capsys.readouterr().out
