"""Exporting a model to a checked deploy file: ONNX (for onnxruntime and other runtimes) or pt2 (torch.export).

    report = kdna_fx.export(kmodel, "model.onnx", input_shape=(3, 224, 224), dynamic_batch=True)
    print(report)      # file size, and the largest relative difference from eager at batches 1 and 7

One exporter: the model (its shared form by default, ``fold=True`` for the folded one) is captured with
``torch.export.export``; pt2 saves that program, ONNX converts it with the dynamo exporter
(``torch.onnx.export(program, dynamo=True)``). The file is written under a temporary name, reloaded
(onnxruntime for ONNX, ``torch.export.load`` for pt2) and compared with the model in eager mode; only a file
that agrees is renamed to ``path``, so a failure leaves nothing there.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import ConfigError, ExportError
from .carried import unwrapped
from .datamodel import find_record, peer_record
from .peers.functional import per_sample_form
from .tables import format_table
from .utils import KeptModes, atomic_path, device_dtype

FORMATS = ("onnx", "pt2")
# Largest |y - y_eager| / max |y_eager| accepted. Measured on every zoo model at 224 px, batch 1 and 7
# (bench/export_check.py): at most 1.4e-6 for ONNX in onnxruntime (another library's convolutions) and 5.4e-7 for
# pt2 (the same ATen kernels as eager; what remains is the folded kernels' rounding).
TOLERANCE = 1e-4
# torch.export specialises batch sizes 0 and 1, so a program with a symbolic batch is captured at batch 2; it then
# runs at any batch from 1 up.
_DYNAMIC_EXAMPLE_BATCH = 2


@dataclass
class ExportReport:
    """What ``export`` wrote and how it compares with eager: ``differences`` maps each checked batch size to
    max |y - y_eager| / max |y_eager| over all outputs. ``original_bytes``: the parameter bytes of the model
    before ``kdna_fx.transform`` (or the peer conversion; the model's own for a plain one), what the file
    stands against."""

    path: str
    format: str
    bytes: int
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    folded: bool
    opset: int | None
    differences: dict[int, float]
    tolerance: float
    original_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def max_difference(self) -> float:
        """The largest relative difference over the checked batch sizes."""
        return max(self.differences.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_difference": self.max_difference}

    def __str__(self) -> str:
        kind = f"ONNX opset {self.opset}" if self.format == "onnx" else "pt2 (torch.export)"
        batch = "dynamic batch" if self.dynamic_batch else f"batch {next(iter(self.differences))} only"
        rows = [[str(b), f"{d:.2e}"] for b, d in self.differences.items()]
        table = format_table(["batch", "max |y - eager| / max |eager|"], rows)
        return (f"{self.path}: {kind}, {'folded' if self.folded else 'not folded'}, {batch}, input "
                f"{'x'.join(map(str, self.input_shape))}, {self.bytes / 1e6:.1f} MB ({self.bytes / self.original_bytes:.2f}"
                f" x the untransformed model's parameters, {self.original_bytes / 1e6:.1f} MB)\n{table}\n"
                f"largest relative difference {self.max_difference:.2e} (tolerance {self.tolerance:.0e})")


def export(model: nn.Module, path: str | os.PathLike[str], *, input_shape: Sequence[int] = (3, 224, 224),
           format: str = "onnx", fold: bool = False, dynamic_batch: bool = False, opset: int | None = None,
           check_batches: Sequence[int] | None = None, tolerance: float = TOLERANCE,
           seed: int = 0) -> ExportReport:
    """Export ``model`` (one image-batch input of per-sample shape ``input_shape``) to ``path`` and check the
    file against the model in eager mode.

    ``fold``: export ``kdna_fx.fold``'s copy of a transformed model, a kernel per child, instead of its shared
    form, which stores each parent kernel once (about half the file) and which onnxruntime folds when the
    session starts, then runs at the folded file's speed; an uncompiled pt2 program of it is slower
    (docs/deployment.md, "Shared or folded"). A plain model has nothing to fold.
    ``dynamic_batch``: a file for every batch size, checked at each of ``check_batches`` (default 1 and 7).
    Without it the file takes one batch size, ``check_batches``' only entry (default 1), and is checked at it.
    ``opset``: the ONNX operator set (default: the exporter's). The model is compared in eval mode, unfolded,
    on seeded normal inputs; the model itself is left as it was. Raises ExportError when the model does not
    export or the file differs from eager by more than ``tolerance``; nothing is then left at ``path``.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    if opset is not None and format != "onnx":
        raise ConfigError(f"an opset applies to ONNX only; drop it for format {format!r}")
    batches = _check_batches(check_batches, dynamic_batch)
    shape = tuple(int(s) for s in input_shape)
    model = unwrapped(model)  # a torch.compile'd model: export the module inside
    where = os.fspath(path)
    seconds: dict[str, float] = {}
    with KeptModes(model), torch.no_grad():
        model.eval()
        start = time.perf_counter()
        deploy = _deploy_form(model, fold)
        # ONNX fixes a Conv's group count in the file, so the peers' per-sample kernels (one grouped conv over the
        # batch) cannot take a dynamic batch there: capture them as im2col and a batched matrix product instead.
        with per_sample_form("matmul" if format == "onnx" and dynamic_batch else "grouped"):
            program = _capture(deploy, shape, batches[0], dynamic_batch, _dtype_device(model))
        seconds["capture"] = time.perf_counter() - start
        # torch.export.load reads a file only by a name ending in .pt2
        with atomic_path(where, suffix=f".tmp.{format}") as tmp:
            start = time.perf_counter()
            saved_opset = _write(program, tmp, format, opset)
            seconds["write"] = time.perf_counter() - start
            start = time.perf_counter()
            run = _reload(tmp, format)
            differences = {b: _difference(model, run, shape, b, seed) for b in batches}
            seconds["check"] = time.perf_counter() - start
            worst = max(differences.values())
            if not worst <= tolerance:  # also catches NaN
                raise ExportError(f"the exported {format} file differs from the model in eager mode by {worst:.2e} "
                                  f"(relative, batches {list(differences)}), over the tolerance {tolerance:.0e}: the "
                                  f"model's forward is not what the export captured (randomness, Python state, "
                                  f"train-mode behaviour); fix the forward, or raise the tolerance if this is rounding")
            size = os.path.getsize(tmp)
    return ExportReport(path=where, format=format, bytes=size, input_shape=shape, dynamic_batch=dynamic_batch,
                        folded=deploy is not model, opset=saved_opset, differences=differences,
                        tolerance=tolerance, original_bytes=_original_bytes(model), seconds=seconds)


def _check_batches(check_batches: Sequence[int] | None, dynamic_batch: bool) -> list[int]:
    batches = [int(b) for b in check_batches] if check_batches is not None else ([1, 7] if dynamic_batch else [1])
    if not batches or min(batches) < 1:
        raise ConfigError(f"check batch sizes must be one or more integers >= 1, got {list(batches)}")
    if not dynamic_batch and len(batches) > 1:
        raise ConfigError(f"a static-batch export takes one batch size, so it can be checked at one only (got "
                          f"{batches}): pass one batch size, or export with a dynamic batch (--dynamic-batch) to "
                          f"check several")
    return batches


def _deploy_form(model: nn.Module, fold: bool) -> nn.Module:
    """The module to export: ``kdna_fx.fold``'s copy of a transformed, unfolded model, else the model itself."""
    record = find_record(model)
    if not fold or record is None or record.folded:
        return model
    from .api import fold as fold_model

    return fold_model(model)


def _original_bytes(model: nn.Module) -> int:
    """Parameter bytes of ``model`` before it was transformed or converted (its own if it was not)."""
    record = find_record(model) or peer_record(model)
    dtype, _ = _dtype_device(model)
    count = record.params_before if record is not None else sum(p.numel() for p in model.parameters())
    return count * dtype.itemsize


def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    device, dtype = device_dtype(model)
    return dtype or torch.get_default_dtype(), device


def _inputs(shape: tuple[int, ...], batch: int, seed: int, like: tuple[torch.dtype, torch.device]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + batch)
    dtype, device = like
    return torch.randn(batch, *shape, generator=generator, dtype=dtype).to(device)


def _capture(model: nn.Module, shape: tuple[int, ...], batch: int, dynamic_batch: bool,
             like: tuple[torch.dtype, torch.device]) -> torch.export.ExportedProgram:
    example = _inputs(shape, _DYNAMIC_EXAMPLE_BATCH if dynamic_batch else batch, 0, like)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 - whatever stops the capture, the user's fix is in their model
        raise ExportError(f"{type(model).__name__} does not export with torch.export (input "
                          f"{tuple(example.shape)}): {_first_line(exc)}. Make the forward traceable (no Python "
                          f"branches on tensor values), check the input shape (input_shape; --image-size, --in-chans), "
                          f"or export without a dynamic batch") from None


def _write(program: torch.export.ExportedProgram, where: str, format: str, opset: int | None) -> int | None:
    """Write ``program`` to ``where``; the ONNX opset written, or None for pt2."""
    if format == "pt2":
        torch.export.save(program, where)
        return None
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it; say so before it fails deep inside)
        import onnxruntime  # noqa: F401  (the check runs in it)
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs onnx, onnxscript and onnxruntime ({exc}): pip install "
                          f"'kdna_fx[deploy]', or use format 'pt2'") from None
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, verbose=False)
        # One self-contained file (no external data beside it): it can be renamed whole. Protobuf caps it at 2 GB.
        onnx_program.save(where, external_data=False)
    except Exception as exc:  # noqa: BLE001 - the converter's own error, as one line
        raise ExportError(f"torch.onnx cannot convert the exported program{f' at opset {opset}' if opset else ''}: "
                          f"{_first_line(exc)}. Try another --opset (18 or later), a fixed batch (no --dynamic-batch), or "
                          f"--format pt2") from None
    return int(onnx_program.model.opset_imports[""])


def _reload(where: str, format: str) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A function running the file at ``where`` on one input, returning its outputs flattened."""
    if format == "pt2":
        module = torch.export.load(where).module()
        return lambda x: [t for t in tree_leaves(module(x)) if isinstance(t, torch.Tensor)]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(where, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error, as one line
        raise ExportError(f"onnxruntime cannot load the exported file: {_first_line(exc)}. Try another --opset, "
                          f"or --format pt2") from None
    name = session.get_inputs()[0].name
    return lambda x: [torch.from_numpy(y) for y in session.run(None, {name: x.detach().cpu().numpy()})]


def _difference(model: nn.Module, run: Callable[[torch.Tensor], list[torch.Tensor]], shape: tuple[int, ...],
                batch: int, seed: int) -> float:
    """max |y - y_eager| / max |y_eager| over every output of ``model`` on a seeded input of ``batch`` samples."""
    x = _inputs(shape, batch, seed, _dtype_device(model))
    expected = [t for t in tree_leaves(model(x)) if isinstance(t, torch.Tensor)]
    try:
        got = run(x)
    except Exception as exc:  # noqa: BLE001 - the exported file fails where the model runs
        raise ExportError(f"the exported file fails at batch {batch} where the model runs: {_first_line(exc)}. "
                          f"Export with --dynamic-batch to run it at other batch sizes") from None
    if len(got) != len(expected):
        raise ExportError(f"the exported file returns {len(got)} outputs where the model returns {len(expected)}")
    worst = 0.0
    for y, ref in zip(got, expected):
        ref = ref.detach().cpu().double()
        y = y.detach().cpu().double()
        if y.shape != ref.shape:
            raise ExportError(f"the exported file returns an output of shape {tuple(y.shape)} where the model "
                              f"returns {tuple(ref.shape)}")
        if not torch.isfinite(ref).all():
            raise ExportError(f"the model's own output at batch {batch} is not finite, so the file cannot be "
                              f"checked against it: check the model's weights (a diverged checkpoint?)")
        scale = max(ref.abs().max().item(), torch.finfo(torch.float32).tiny)
        difference = (y - ref).abs().max().item() / scale
        worst = math.inf if math.isnan(difference) else max(worst, difference)
    return worst


def _first_line(exc: BaseException) -> str:
    """The first line of the exception that started it all: the exporters wrap the real reason in their own."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
