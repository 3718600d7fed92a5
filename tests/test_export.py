"""kdna_fx.export and `kdna export`: a small zoo model to ONNX and pt2, checked against eager; every source kind of the
command; the bad inputs, each a one-line error that leaves nothing at the output path.

Every zoo model at full size is measured by bench/export_check.py (bench/results/export/).
"""
from __future__ import annotations

import copy
import os

import torchvision

import pytest
import torch
from torch import nn

import kdna_fx
from kdna_fx.testing import write_tiny_fashion_mnist
from kdna_fx.cli import main
from kdna_fx.exporting import TOLERANCE
from kdna_fx.models import create_model
from kdna_fx.testing import TinyResNet, randomize_adapters

# Tier integration: make test-fast leaves it out (ONNX and pt2 exports checked in onnxruntime and torch.export).
# One xdist worker runs the whole file (make test: -n 2 --dist loadgroup): its tests share a cached build.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_export")]

SHAPE = (3, 16, 16)
SMALL = dict(num_classes=10, small_stem=True, width=0.25)
SMALL_ARGS = ["--num-classes", "10", "--small-stem", "--width", "0.25", "--image-size", "16"]


def _small_zoo_model() -> nn.Module:
    """kdna_resnet18 (width 0.25) with random adapters and BatchNorm statistics moved by three batches, so that
    its children differ from their parents and its logits are O(1) (docs/deployment.md, tolerances)."""
    torch.manual_seed(0)
    model = create_model("kdna_resnet18", **SMALL)
    randomize_adapters(model)
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(8, *SHAPE))
    return model.eval()


@pytest.fixture(scope="module")
def zoo_model() -> nn.Module:
    return _small_zoo_model()


def _leftovers(directory) -> list[str]:
    return sorted(os.listdir(directory))


# ---- the library function ------------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["onnx", "pt2"])
def test_dynamic_batch_export_agrees_with_eager_at_batch_1_and_7(zoo_model, format, tmp_path):
    if format == "onnx":
        pytest.importorskip("onnxruntime")
    before = {k: v.clone() for k, v in zoo_model.state_dict().items()}
    path = tmp_path / f"model.{format}"
    report = kdna_fx.export(zoo_model, path, input_shape=SHAPE, format=format, dynamic_batch=True)
    assert sorted(report.differences) == [1, 7]
    assert 0 <= report.max_difference < TOLERANCE, report
    assert not report.folded and report.dynamic_batch  # the shared form by default: the small file
    assert report.bytes == os.path.getsize(path) > 0
    assert _leftovers(tmp_path) == [f"model.{format}"]  # no temporary file beside it
    assert (report.opset is not None) == (format == "onnx")
    assert "largest relative difference" in str(report) and f"{report.bytes / 1e6:.1f} MB" in str(report)
    # against the untransformed model's parameters: the reference topology before sharing, in float32
    assert report.original_bytes == 4 * kdna_fx.datamodel.record_of(zoo_model).params_before
    assert f"x the untransformed model's parameters, {report.original_bytes / 1e6:.1f} MB" in str(report)
    # the model given is left as it was: same tensors, eval mode kept, not folded
    assert all(torch.equal(v, before[k]) for k, v in zoo_model.state_dict().items())
    assert not kdna_fx.datamodel.record_of(zoo_model).folded

    # the file itself, reloaded here: runs at a batch the check did not use, and agrees with the folded model
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        expected = kdna_fx.fold(zoo_model)(x)
    if format == "pt2":
        got = torch.export.load(str(path)).module()(x)
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=TOLERANCE, atol=TOLERANCE * expected.abs().max().item())


# ODConv checks the peers' ONNX form (it has every attention); the others (about 8 s each) run in make test-all.
@pytest.mark.parametrize("tag", [pytest.param("condconv", marks=pytest.mark.slow), "odconv",
                                 pytest.param("kernelwarehouse", marks=pytest.mark.slow)])
def test_a_peer_exports_to_onnx_at_a_dynamic_batch(tag, tmp_path):
    # ONNX's Conv fixes its group count, so the peers' grouped per-sample convolution could not take a dynamic
    # batch; export captures their matmul form instead and the file must still agree at batch 1 and 7.
    # A small ResNet with reflect padding keeps it quick; bench/export_check.py runs every zoo peer at 224 px.
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = getattr(kdna_fx.peers, tag)(TinyResNet(padding_mode="reflect")).eval()
    report = kdna_fx.export(model, tmp_path / "peer.onnx", input_shape=SHAPE, format="onnx", dynamic_batch=True)
    assert sorted(report.differences) == [1, 7] and report.max_difference <= TOLERANCE
    assert _leftovers(tmp_path) == ["peer.onnx"]


def test_static_export_takes_its_one_batch_and_the_unfolded_form_is_smaller(zoo_model, tmp_path):
    folded = kdna_fx.export(zoo_model, tmp_path / "folded.pt2", input_shape=SHAPE, format="pt2", fold=True,
                            check_batches=[7])
    shared = kdna_fx.export(zoo_model, tmp_path / "shared.pt2", input_shape=SHAPE, format="pt2")
    assert list(folded.differences) == [7] and list(shared.differences) == [1]  # static default: batch 1
    assert folded.folded and not shared.folded
    assert shared.bytes < folded.bytes  # the shared form stores each parent kernel once
    program = torch.export.load(str(tmp_path / "folded.pt2")).module()
    program(torch.randn(7, *SHAPE))
    with pytest.raises(Exception):  # a static file is for its own batch size only
        program(torch.randn(2, *SHAPE))


def test_a_plain_model_exports_unfolded_and_train_mode_is_restored(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()).train()
    report = kdna_fx.export(model, tmp_path / "plain.pt2", input_shape=(3, 8, 8), format="pt2")
    assert not report.folded and report.max_difference < TOLERANCE
    assert report.original_bytes == 4 * sum(p.numel() for p in model.parameters())
    assert all(m.training for m in model.modules())


class _Branchy(nn.Module):
    """A forward that branches on a tensor's value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


class _Noisy(nn.Module):
    """Random in eval mode: it exports, but no file can agree with it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + torch.rand_like(x[:, :1, 2:, 2:])


@pytest.mark.parametrize("model, kwargs, error, needle", [
    (_Branchy(), {}, kdna_fx.ExportError, "does not export with torch.export"),
    (_Noisy(), {}, kdna_fx.ExportError, "over the tolerance"),
    (_Branchy(), {"format": "tflite"}, kdna_fx.ConfigError, "unknown export format 'tflite'"),
    (_Branchy(), {"opset": 18}, kdna_fx.ConfigError, "applies to ONNX only"),
    (_Branchy(), {"check_batches": [1, 7]}, kdna_fx.ConfigError, "--dynamic-batch"),
    (_Branchy(), {"check_batches": [0], "dynamic_batch": True}, kdna_fx.ConfigError, ">= 1"),
], ids=["no-export", "mismatch", "format", "opset-pt2", "static-two-batches", "batch-0"])
def test_bad_input_raises_and_leaves_what_was_at_the_path(model, kwargs, error, needle, tmp_path):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"an earlier export")
    with pytest.raises(error, match=needle) as info:
        kdna_fx.export(model, path, input_shape=(3, 8, 8), **{"format": "pt2", **kwargs})
    assert "\n" not in str(info.value)
    assert path.read_bytes() == b"an earlier export" and _leftovers(tmp_path) == ["model.pt2"]


# ---- the command ---------------------------------------------------------------------------------------
def _export(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_exports_a_zoo_model_by_name(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "k18.onnx"
    code, printed, err = _export(["kdna_resnet18", "--format", "onnx", "--dynamic-batch", "--out", str(out),
                                  *SMALL_ARGS], capsys)
    assert code == 0, err
    assert out.exists() and f"wrote {out}" in printed and "batch" in printed and "7" in printed
    assert '"num_classes": 10' in printed and _leftovers(tmp_path) == ["k18.onnx"]
    assert "not folded" in printed and "channels: the ModelSpec's; image size: --image-size" in printed
    import onnxruntime as ort

    (feed,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()
    assert isinstance(feed.shape[0], str) and list(feed.shape[1:]) == list(SHAPE)


def test_command_exports_a_kdna_fx_save_file(zoo_model, tmp_path, capsys):
    path = tmp_path / "k18.safetensors"
    kdna_fx.save(zoo_model, path)
    out = tmp_path / "k18.pt2"
    code, _, err = _export([str(path), "--model", "kdna_resnet18", "--format", "pt2", "--out", str(out),
                            *SMALL_ARGS], capsys)
    assert code == 0, err
    x = torch.randn(1, *SHAPE)
    with torch.no_grad():
        expected = zoo_model(x)
    got = torch.export.load(str(out)).module()(x)
    torch.testing.assert_close(got, expected, rtol=TOLERANCE, atol=TOLERANCE * expected.abs().max().item())

    alone = tmp_path / "alone.pt2"  # the file records its builder (create_model): it rebuilds its own model
    code, printed, err = _export([str(path), "--format", "pt2", "--out", str(alone), *SMALL_ARGS], capsys)
    assert code == 0 and alone.exists(), err
    assert "input 3x16x16 (channels: the ModelSpec's; image size: --image-size)" in printed
    torch.testing.assert_close(torch.export.load(str(alone)).module()(x), expected, rtol=TOLERANCE,
                               atol=TOLERANCE * expected.abs().max().item())

    anonymous = tmp_path / "anonymous.safetensors"  # a model built by hand records no builder: --model is needed
    kdna_fx.save(kdna_fx.transform(torchvision.models.resnet18(num_classes=10)), anonymous)
    code, _, err = _export([str(anonymous), "--format", "pt2", "--out", str(tmp_path / "no.pt2")], capsys)
    assert code == 2 and "needs --model NAME" in err and not (tmp_path / "no.pt2").exists()


def test_command_exports_a_saved_file_at_the_input_it_records(zoo_model, tmp_path, capsys):
    # a small-stem model records no image size until its data says which (kdna convert records it); a file
    # without one, as every file written before inputs were recorded, is exported at 224 px and says so
    recorded, unrecorded = tmp_path / "recorded.safetensors", tmp_path / "unrecorded.safetensors"
    kdna_fx.save(zoo_model, unrecorded)
    kmodel = copy.deepcopy(zoo_model)
    kdna_fx.models.record_input(kmodel, image_size=SHAPE[-1])
    kdna_fx.save(kmodel, recorded)
    code, printed, err = _export([str(recorded), "--format", "pt2", "--out", str(tmp_path / "a.pt2")], capsys)
    assert code == 0, err
    assert "input 3x16x16 (channels: the ModelSpec's; image size: the ModelSpec's)" in printed
    torch.export.load(str(tmp_path / "a.pt2")).module()(torch.randn(1, *SHAPE))
    code, printed, err = _export([str(unrecorded), "--format", "pt2", "--out", str(tmp_path / "b.pt2")], capsys)
    assert code == 0, err
    assert "input 3x224x224 (channels: the ModelSpec's; image size: not recorded: the default" in printed


def test_command_exports_a_run_directory_at_its_image_size(tmp_path, capsys):
    data, run_dir = str(tmp_path / "fmnist"), str(tmp_path / "run")
    write_tiny_fashion_mnist(data, n_train=16, n_test=8)
    assert main(["train", "--model", "kdna_resnet18", "--width", "0.125", "--epochs", "1", "--batch-size", "8",
                 "--data", data, "--run-dir", run_dir, "--no-progress", "--limit-steps", "1"]) == 0
    capsys.readouterr()
    out = tmp_path / "run.pt2"
    code, printed, err = _export([run_dir, "--format", "pt2", "--out", str(out)], capsys)
    assert code == 0, err
    assert "input 1x28x28" in printed and "image size: the run's" in printed  # Fashion-MNIST's, from the run
    torch.export.load(str(out)).module()(torch.randn(1, 1, 28, 28))


def test_command_bad_inputs_are_one_line_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "never.onnx"
    weights = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    cut_run = tmp_path / "cut_run"
    cut_run.mkdir()
    torch.save({"model": {"w": torch.zeros(1000)}}, cut_run / "last.pt")
    (cut_run / "last.pt").write_bytes((cut_run / "last.pt").read_bytes()[:2000])  # a copy that did not finish
    cases = [
        (["kdna_resnet18", "--format", "tflite"], "unknown --format 'tflite'"),
        (["kdna_resnet81", "--format", "onnx"], "Did you mean 'kdna_resnet18'"),
        ([str(weights), "--format", "onnx", "--model", "resnet18"], "do not fit resnet18"),
        ([str(weights), "--format", "onnx"], "needs --model"),
        ([str(broken), "--format", "onnx", "--model", "resnet18"], "cannot read"),
        ([str(tmp_path / "nowhere"), "--format", "onnx"], "neither a `kdna train` run directory"),
        ([str(cut_run), "--format", "onnx"], "truncated or corrupt"),
        (["kdna_resnet18", "--format", "pt2", "--opset", "18", *SMALL_ARGS], "applies to ONNX only"),
        (["kdna_resnet18", "--format", "pt2", "--batch-size", "1", "7", *SMALL_ARGS], "--dynamic-batch"),
    ]  # a model that does not export, or disagrees with its file: the library tests above (every zoo model exports)
    for argv, needle in cases:
        code, _, err = _export([*argv, "--out", str(out)], capsys)
        assert code == 2, (argv, err)
        assert needle in err and err.count("\n") == 1 and err.startswith("kdna export: error: "), (needle, err)
        assert _leftovers(tmp_path) == ["broken.safetensors", "cut_run", "weights.pt"], argv


def test_command_a_model_that_does_not_export_is_one_line_without_torch_output(tmp_path, capsys, monkeypatch):
    from kdna_fx.cli import export as export_command

    monkeypatch.setattr(export_command, "source_model", lambda args: (_Branchy(), (3, 8, 8), None, "--image-size"))
    out = tmp_path / "never.pt2"
    code, printed, err = _export(["anything", "--format", "pt2", "--out", str(out)], capsys)
    assert code == 2 and printed == ""
    # torch.export prints the graph on its way to this error; the command shows only its own line
    assert err.startswith("kdna export: error: _Branchy does not export with torch.export") and err.count("\n") == 1
    assert _leftovers(tmp_path) == []
