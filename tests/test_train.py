"""kdna_fx.train: data loading, recipe, exact resume, failure handling, CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

import kdna_fx
from kdna_fx.testing import write_tiny_fashion_mnist
from kdna_fx.errors import ConfigError, KDNAError
from kdna_fx.train import (CheckpointError, DataError, NonFiniteLossError, TrainConfig, WarmupCosine,
                           WrappedModelError, build_data, convert_sync_batchnorm, param_groups, read_checkpoint,
                           read_idx, train)
from kdna_fx.data import FASHION_MNIST_DIR, fashion_mnist, write_idx

# Tier integration: make test-fast leaves it out (trains models for a few steps, kdna train and eval end to end).
pytestmark = pytest.mark.integration


# ---- helpers -------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """Two same-shaped 3x3 convs (one KernelDNA family after transform), GroupNorm, optional dropout."""

    def __init__(self, c: int = 4, classes: int = 3, dropout: float = 0.0, norm: str = "group"):
        super().__init__()
        norm_layer = (lambda: nn.GroupNorm(2, c)) if norm == "group" else (lambda: nn.BatchNorm2d(c))
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), norm_layer(), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), norm_layer(), nn.ReLU())
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.drop(self.body(torch.relu(self.stem(x))).mean((2, 3))))


def tiny_kdna(gate_norm: str = "layer", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    config = kdna_fx.KDNAConfig(adapter=kdna_fx.AdapterConfig(gate_norm=gate_norm))
    return kdna_fx.transform(Tiny(**kwargs), config)


def synthetic(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


def config(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, lr=0.05, warmup_epochs=0.5, device="cpu", amp="none", progress=False,
                log_every=1, seed=1)
    return TrainConfig(**{**base, **kw})


# ---- data ----------------------------------------------------------------------------------------------
def test_read_idx_round_trip_and_errors(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(str(tmp_path / "img.gz"), images)
    assert torch.equal(read_idx(tmp_path / "img.gz"), torch.from_numpy(images))
    ints = np.array([-5, 7, 1 << 20], dtype=np.int32)
    write_idx(str(tmp_path / "ints"), ints, code=0x0C, gz=False)
    assert read_idx(tmp_path / "ints").tolist() == ints.tolist()

    raw = (tmp_path / "ints").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-2])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_layout_from_tiny_idx_files(tmp_path):
    write_tiny_fashion_mnist(tmp_path)
    bundle = build_data("fashion-mnist", str(tmp_path))
    assert (len(bundle.train), len(bundle.val), bundle.num_classes, bundle.in_chans) == (6, 4, 10, 1)
    x, y = bundle.val[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")[0].float() / 255
    torch.testing.assert_close(x[0], (raw - 0.2860) / 0.3530)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist(str(tmp_path / "nowhere"))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_smoke(tmp_path):
    bundle = build_data("fashion-mnist", train_subset=32, val_subset=16)
    assert len(bundle.train) == 32 and len(bundle.val) == 16
    labels = [bundle.train[i][1] for i in range(32)]
    assert all(0 <= lab < 10 for lab in labels) and len(set(labels)) > 2
    model = kdna_fx.transform(Tiny(classes=10), kdna_fx.KDNAConfig(adapter=kdna_fx.AdapterConfig(gate_norm="layer")))
    result = train(model, bundle.train, bundle.val, config(epochs=1, batch_size=16), str(tmp_path / "run"))
    assert result["final"]["val_images"] == 16 and np.isfinite(result["final"]["train_loss"])


def _png_tree(root, classes=("cat", "dog"), per_class=5, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_single_tree_split_and_train_val_layout(tmp_path):
    _png_tree(tmp_path / "single")
    bundle = build_data("folder", str(tmp_path / "single"), image_size=8, val_fraction=0.2, seed=3)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes, bundle.in_chans) == (8, 2, 2, 3)
    x, y = bundle.train[0]
    assert x.shape == (3, 8, 8) and y in (0, 1)
    assert bundle.val[0][0].shape == (3, 8, 8)

    _png_tree(tmp_path / "split" / "train", per_class=3)
    _png_tree(tmp_path / "split" / "val", per_class=2)
    bundle = build_data("folder", str(tmp_path / "split"), image_size=8)
    assert (len(bundle.train), len(bundle.val)) == (6, 4)

    _png_tree(tmp_path / "odd" / "train", classes=("a", "b"), per_class=1)
    _png_tree(tmp_path / "odd" / "val", classes=("a", "c"), per_class=1)
    with pytest.raises(DataError, match="different class folders"):
        build_data("folder", str(tmp_path / "odd"))
    with pytest.raises(DataError, match="ImageNet layout expected"):
        build_data("imagenet", str(tmp_path / "single"))


# ---- recipe --------------------------------------------------------------------------------------------
def test_weight_decay_groups():
    model = tiny_kdna(gate_norm="batch")
    groups = {g["group_name"]: g for g in param_groups(model, weight_decay=1e-4, adapter_weight_decay=0.0)}
    names = {k: set(g["param_names"]) for k, g in groups.items()}
    assert names["adapter"] == {"body.3.filter_scale", "body.3.spatial_scale", "body.3.gate.fc1.weight",
                                "body.3.gate.fc2.weight"}
    assert {"body.3.gate.norm.weight", "body.3.gate.fc2.bias", "body.1.weight", "stem.bias",
            "head.bias"} <= names["no_decay"]
    assert names["decay"] == {"stem.weight", "body.0.weight", "head.weight"}  # the shared parent kernel, once
    assert [groups[k]["weight_decay"] for k in ("decay", "no_decay", "adapter")] == [1e-4, 0.0, 0.0]
    listed = [p for g in groups.values() for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    decayed = {g["group_name"]: g["weight_decay"] for g in param_groups(model, 1e-4, adapter_weight_decay=5e-5)}
    assert decayed["adapter"] == 5e-5


def test_warmup_cosine_schedule_and_state():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, total_steps=10, warmup_steps=2, warmup_start=0.0)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(10):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[:3] == [0.0, 0.5, 1.0]
    assert lrs[6] == pytest.approx(0.5) and lrs[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    other = WarmupCosine(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=10, warmup_steps=2)
    other.load_state_dict({**sched.state_dict(), "step_count": 4})
    assert other.get_last_lr()[0] == pytest.approx(lrs[4])
    with pytest.raises(ValueError, match="total_steps"):
        other.load_state_dict({**sched.state_dict(), "total_steps": 11})


# ---- loop: resume, non-finite, checkpoints -------------------------------------------------------------
class _Stop(Exception):
    pass


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    data, val = synthetic(48), synthetic(16, seed=1)
    cfg = config(label_smoothing=0.1)
    full = tiny_kdna(dropout=0.3)  # dropout: the RNG state must be restored too
    train(full, data, val, cfg, str(tmp_path / "full"))

    def interrupt(epoch, record):
        if epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train(tiny_kdna(dropout=0.3), data, val, cfg, str(tmp_path / "cut"), on_epoch_end=interrupt)
    assert read_checkpoint(str(tmp_path / "cut" / "last.pt"))["epoch"] == 1
    resumed = tiny_kdna(dropout=0.3)
    train(resumed, data, val, cfg, str(tmp_path / "cut"), resume=True)

    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["body.0.weight"], tiny_kdna(dropout=0.3).state_dict()["body.0.weight"])
    history = json.loads((tmp_path / "cut" / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in history] == [1, 2, 3]
    full_history = json.loads((tmp_path / "full" / "metrics.json").read_text())["epochs"]
    assert [e["val_top1"] for e in history] == [e["val_top1"] for e in full_history]


def test_fresh_run_refuses_to_overwrite_and_resume_checks_options(tmp_path):
    data = synthetic(16)
    train(tiny_kdna(), data, None, config(epochs=1), str(tmp_path))
    with pytest.raises(CheckpointError, match="--resume"):
        train(tiny_kdna(), data, None, config(epochs=1), str(tmp_path))
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.05 vs now 0.1"):
        train(tiny_kdna(), data, None, config(epochs=1, lr=0.1), str(tmp_path), resume=True)


class _BlowUp(nn.Module):
    """Returns NaN logits from its ``after``-th training forward on."""

    def __init__(self, after: int):
        super().__init__()
        self.inner, self.after, self.calls = Tiny(), after, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                return out * float("nan")
        return out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = _BlowUp(after=8)  # 48 images / batch 8 = 6 steps per epoch: blows up in epoch 2
    with pytest.raises(NonFiniteLossError, match=r"epoch 2 .*last good checkpoint .*after epoch 1.* kept"):
        train(model, synthetic(48), None, config(), str(tmp_path))
    ckpt = read_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert len(json.loads((tmp_path / "metrics.json").read_text())["epochs"]) == 1


def test_corrupt_or_mismatched_checkpoint_errors(tmp_path):
    run = tmp_path / "run"
    train(tiny_kdna(), synthetic(16), None, config(epochs=2), str(run))
    path = run / "last.pt"
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*without resume=True \(--resume\)"):
        train(tiny_kdna(), synthetic(16), None, config(epochs=2), str(run), resume=True)

    path.write_bytes(good)
    with pytest.raises(CheckpointError, match=r"different model \(not recorded\).*differ in shape.*body.0.weight"):
        train(tiny_kdna(c=6), synthetic(16), None, config(epochs=2), str(run), resume=True)
    with pytest.raises(CheckpointError, match="not in the checkpoint"):
        train(tiny_kdna(gate_norm="batch"), synthetic(16), None, config(epochs=2), str(run), resume=True)

    # a checkpoint that records its model names it as the call that builds it
    from kdna_fx.models import create_model
    from kdna_fx.spec import spec_of
    from kdna_fx.train.checkpoint import check_model_matches, model_signature

    recorded = create_model("resnet18", width=0.125, small_stem=True, in_chans=1, num_classes=5)
    ckpt = {"signature": model_signature(recorded), "config": {"model": spec_of(recorded).to_dict()}}
    with pytest.raises(CheckpointError, match=r"different model \(create_model\('resnet18\.plain', width=0.125, .*"
                                              r"Build that model"):
        check_model_matches(ckpt, tiny_kdna(), str(path))

    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a kdna training checkpoint"):
        read_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(tiny_kdna(), synthetic(16), None, config(), str(tmp_path / "empty"), resume=True)


def test_train_refuses_wrapped_models(tmp_path):
    with pytest.raises(WrappedModelError, match="plain model") as info:
        train(torch.compile(tiny_kdna()), synthetic(16), None, config(), str(tmp_path))
    assert isinstance(info.value, TypeError) and isinstance(info.value, KDNAError)


def test_bad_options_and_too_little_data_are_kdna_errors(tmp_path):
    for bad in (dict(optimizer="adam"), dict(epochs=0), dict(batch_size=0)):
        with pytest.raises(ConfigError):
            config(**bad)
    with pytest.raises(DataError, match="fewer than batch_size=32") as info:
        train(tiny_kdna(), synthetic(16), None, config(batch_size=32), str(tmp_path))
    assert isinstance(info.value, KDNAError) and isinstance(info.value, ValueError)
    with pytest.raises(DataError) as info:
        build_data("folder")  # no --data
    assert isinstance(info.value, KDNAError)


def test_sync_batchnorm_conversion_reaches_gate_norms():
    model = tiny_kdna(gate_norm="batch", norm="batch").train()
    x = torch.randn(6, 1, 8, 8)
    keys, expected = set(model.state_dict()), model(x)
    synced = convert_sync_batchnorm(model)
    norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    gate_norm = synced.get_submodule("body.3.gate.norm")
    calls = []
    gate_norm.register_forward_hook(lambda *a: calls.append(1))
    # Without a process group SyncBatchNorm computes plain batch norm: same numbers, same tensor names.
    torch.testing.assert_close(synced(x), expected)
    assert calls, "the gate must call its (Sync)BatchNorm module, not a functional batch norm"
    assert set(synced.state_dict()) == keys


# ---- CLI (end to end, through kdna_fx.models) ----------------------------------------------------------
def test_cli_train_eval_resume(tmp_path, capsys):
    """kdna train / --resume / eval on a tiny Fashion-MNIST in IDX files, so it never depends on the Debian data."""
    from kdna_fx.cli import main

    data = str(tmp_path / "fmnist")
    write_tiny_fashion_mnist(data, n_train=32, n_test=16)
    run = str(tmp_path / "run")
    assert main(["train", "--model", "replace_resnet18", "--width", "0.125", "--epochs", "1", "--batch-size", "8",
                 "--limit-steps", "2", "--data", data, "--run-dir", run, "--no-progress", "--device", "cpu"]) == 0
    assert f"on Fashion-MNIST ({data}): 32 train / 16 val images" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1] and metrics["epochs"][0]["val_images"] == 16
    assert metrics["config"]["model"]["name"] == "replace_resnet18" and metrics["config"]["limit_steps"] == 2

    assert main(["train", "--resume", "--run-dir", run, "--epochs", "3"]) == 2
    assert "kdna train: error: --resume continues the run" in capsys.readouterr().err
    weights = read_checkpoint(os.path.join(run, "last.pt"))["model"]
    assert main(["train", "--resume", "--run-dir", run, "--no-progress"]) == 0  # already complete: nothing to do
    after = read_checkpoint(os.path.join(run, "last.pt"))
    assert after["epoch"] == 1 and all(torch.equal(weights[k], after["model"][k]) for k in weights)

    assert main(["eval", run, "--no-progress", "--device", "cpu", "--out", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "replace_resnet18 (epoch 1)" in out and "top-1" in out and "over 16 images" in out
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 16

    assert main(["train", "--model", "resnet18", "--width", "0.125", "--data", data, "--run-dir", run,
                 "--no-progress"]) == 2
    assert "kdna train: error:" in (err := capsys.readouterr().err) and "already holds a checkpoint" in err
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "Fashion-MNIST files not found" in capsys.readouterr().err


def test_a_run_of_an_older_kdna_fx_still_resumes_and_evaluates(tmp_path, capsys):
    """Checkpoints written before ModelSpec and DataSpec hold the model options flat and the data under "path"."""
    from kdna_fx.cli import main

    data = str(tmp_path / "fmnist")
    write_tiny_fashion_mnist(data, n_train=16, n_test=8)
    run, elsewhere = str(tmp_path / "run"), str(tmp_path / "moved")
    assert main(["train", "--model", "replace_resnet18", "--width", "0.125", "--epochs", "1", "--batch-size", "8",
                 "--limit-steps", "1", "--data", data, "--run-dir", run, "--no-progress", "--device", "cpu"]) == 0
    path = os.path.join(run, "last.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["model"]["kwargs"]["width"] == 0.125 and ckpt["config"]["data"]["root"] == data
    ckpt["config"]["model"] = {"name": "replace_resnet18", "width": 0.125, "small_stem": True, "gate_norm": None,
                               "num_classes": 10, "in_chans": 1}
    ckpt["config"]["data"] = {"dataset": "fashion-mnist", "path": data, "image_size": None, "val_fraction": 0.1,
                              "train_subset": None, "val_subset": None}
    torch.save(ckpt, path)
    os.rename(data, elsewhere)  # the data moved: --data on resume and eval says where it is now
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", run, "--width", "0.125", "--data", elsewhere,
                 "--no-progress"]) == 0
    assert main(["train", "--resume", "--run-dir", run, "--width", "0.25", "--no-progress"]) == 2
    assert "--width 0.25 (the run used 0.125)" in capsys.readouterr().err
    assert main(["eval", run, "--data", elsewhere, "--no-progress", "--device", "cpu"]) == 0
    assert "replace_resnet18 (epoch 1)" in capsys.readouterr().out


def test_cli_eval_takes_a_self_describing_kdna_fx_save_file(tmp_path, capsys):
    from kdna_fx.cli import main

    data = str(tmp_path / "fmnist")
    write_tiny_fashion_mnist(data, n_train=4, n_test=12)
    model = kdna_fx.models.create_model("resnet18.replace", num_classes=10, in_chans=1, small_stem=True, width=0.125)
    kdna_fx.save(model, tmp_path / "k.safetensors")
    assert main(["eval", str(tmp_path / "k.safetensors"), "--data", data, "--no-progress", "--device", "cpu"]) == 0
    assert "resnet18.replace on Fashion-MNIST" in (out := capsys.readouterr().out) and "over 12 images" in out
    kdna_fx.save(kdna_fx.transform(torchvision.models.resnet18()), tmp_path / "anonymous.safetensors")
    assert main(["eval", str(tmp_path / "anonymous.safetensors"), "--data", data, "--no-progress"]) == 2
    assert "does not record how its model was built" in capsys.readouterr().err


def test_cli_unknown_model_is_a_clean_error(tmp_path, capsys):
    from kdna_fx.cli import main

    data = str(tmp_path / "fmnist")
    write_tiny_fashion_mnist(data)
    assert main(["train", "--model", "no_such_net", "--data", data, "--run-dir", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "unknown model" in capsys.readouterr().err
