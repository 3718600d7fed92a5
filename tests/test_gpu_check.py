"""bench/gpu_check.py, the check prepared for a lent GPU machine, run end to end on the CPU with --dry-run (tiny
sizes, a cheap compile backend) so that it cannot rot between GPU sessions."""
from __future__ import annotations

import json
import os

import pytest
import torch

# Tier bench: a smoke run of a bench/ script (make test-all) (dry-runs bench/gpu_check.py (the GPU machine's script) on the CPU).
pytestmark = pytest.mark.bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    from bench import gpu_check  # `python -m pytest` runs from the repository root

    return gpu_check


def test_the_gpu_check_runs_dry_on_the_cpu(tmp_path):
    before = torch.get_num_threads()
    try:
        record = _load().main(["--dry-run", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(before)
    parts = record["parts"]
    assert parts["tests"]["status"].startswith("not run")
    assert parts["gradients"]["status"] == "done" and parts["gradients"]["TinyResNet"]["ok"]
    assert parts["speed"]["status"] == "done", parts["speed"]
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["dry_run"] and on_disk["provenance"]["command"].endswith("--dry-run --out " + str(tmp_path))
    assert "# GPU check (dry run)" in (tmp_path / "gpu_check.md").read_text()
    timing = json.loads((tmp_path / "speed" / "mobilenet_v2_cpu.json").read_text())["timings"]
    assert set(timing) == {"eager", "cudagraphs"}
    train = json.loads((tmp_path / "speed" / "mobilenet_v2_cpu_train.json").read_text())
    assert train["amp"] == "bf16" and train["batch"] == 2 and set(train["train"]["replace"]) == {"eager", "inductor"}


def test_without_a_gpu_the_real_check_refuses_with_the_fix():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit, match="--dry-run"):
        _load().main([])
