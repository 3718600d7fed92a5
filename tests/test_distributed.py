"""Two CPU processes (torchrun, gloo, localhost) train a KernelDNA model with DDP through kdna_fx.train.train.

The model has no batch statistics (GroupNorm, gates with gate_norm='layer'), so a 2-process run on 2 x 4
images per step must equal a 1-process run on the same 8-image global batches, up to float summation order.
This file is also the worker script: torchrun runs it with ``--worker OUT``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

# Tier integration: make test-fast leaves it out (spawns DDP processes).
pytestmark = pytest.mark.integration

TOLERANCE = dict(rtol=1e-4, atol=1e-5)


class Tiny(nn.Module):
    def __init__(self, c: int = 4, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c), nn.ReLU())
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.body(torch.relu(self.stem(x))).mean((2, 3)))


def build():
    import kdna_fx

    torch.manual_seed(0)
    # Trace/transform first; train() wraps the result in DDP afterwards.
    return kdna_fx.transform(Tiny(), kdna_fx.KDNAConfig(adapter=kdna_fx.AdapterConfig(gate_norm="layer")))


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return TensorDataset(x, (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 0, :, :4].mean((1, 2)) > 0).long())


def run(run_dir: str, batch_size: int):
    from kdna_fx.train import TrainConfig, train

    model = build()
    config = TrainConfig(epochs=2, batch_size=batch_size, lr=0.2, warmup_epochs=0.5, label_smoothing=0.1,
                         device="cpu", amp="none", progress=False, log_every=1, seed=3)
    result = train(model, data(40, 0), data(13, 1), config, run_dir)
    return model, result


def _worker(out: str) -> None:
    torch.set_num_threads(1)
    model, result = run(os.path.join(out, "ddp"), batch_size=4)
    rank = int(os.environ["RANK"])
    torch.save({"state": model.state_dict(), "history": result["history"],
                "parent_is_shared": _parent_is_shared(model)}, os.path.join(out, f"rank{rank}.pt"))


def _parent_is_shared(model: nn.Module) -> bool:
    # One Parameter object for the parent kernel; the children hold no kernel of their own.
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    return "body.0.weight" in names and not any(n.startswith(("body.3.", "body.6.")) and n.endswith(".weight")
                                                and "gate" not in n for n in names)


def test_ddp_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           os.path.abspath(__file__), "--worker", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # The parent kernels (and everything else) are bit-identical on both ranks after training.
    assert all(r["parent_is_shared"] for r in ranks)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key

    torch.set_num_threads(1)
    single, result = run(str(tmp_path / "single"), batch_size=8)
    initial = build().state_dict()
    for key, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, **TOLERANCE, msg=lambda m: f"{key}: {m}")
    assert not torch.allclose(initial["body.0.weight"], single.state_dict()["body.0.weight"], **TOLERANCE)

    # Metrics: summed over ranks (eval shards without padding), written once by rank 0.
    for ddp, one in zip(ranks[0]["history"], result["history"]):
        assert ddp["train_images"] == one["train_images"] == 40
        assert ddp["val_images"] == one["val_images"] == 13
        assert ddp["val_top1"] == pytest.approx(one["val_top1"])
        assert ddp["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    saved = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    assert sorted(os.listdir(tmp_path / "ddp")) == ["last.pt", "metrics.json"]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
