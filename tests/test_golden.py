"""Golden snapshots of what the planner decided, so that plan changes are reviewed, not guessed.

Regenerate after an intended change with `.venv/bin/python -m pytest tests/test_golden.py --update-golden`
and review the diff of tests/golden/*.json in the commit.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest
import torchvision

import kdna_fx
from kdna_fx import KDNAConfig

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "resnet18": ("resnet18", KDNAConfig()),
    "resnet50": ("resnet50", KDNAConfig()),
    "mobilenet_v2_pointwise": ("mobilenet_v2", KDNAConfig(kernel_sizes=(1,))),
    "vgg11": ("vgg11", KDNAConfig()),
    "regnet_x_400mf": ("regnet_x_400mf", KDNAConfig()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_matches_golden_snapshot(case, request):
    builder, config = CASES[case]
    plan = kdna_fx.plan(torchvision.models.get_model(builder, weights=None), config)
    current = json.dumps({"model": builder, "config": plan.config.to_dict(), **plan.to_dict()}, indent=1) + "\n"
    path = GOLDEN / f"{case}.json"
    if request.config.getoption("--update-golden"):
        path.write_text(current)
        pytest.skip(f"rewrote {path.name}")
    assert path.exists(), f"no snapshot {path.name}: run pytest tests/test_golden.py --update-golden and commit it"
    expected = path.read_text()
    if current != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), current.splitlines(True),
                                            f"golden/{path.name}", "current plan"))
        pytest.fail(f"the plan for {case} changed; review and regenerate with --update-golden:\n{diff}")
