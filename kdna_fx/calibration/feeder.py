"""Feeding calibration: its passes over the data (through the data room's feeder), and the runner that runs the
model and its reference on the same batch."""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor, nn

from kdna_fx.data import image_batches
from kdna_fx.errors import CalibrationError, DataError
from kdna_fx.utils import KeptModes, device_dtype


class Batches:
    """Calibration's passes over its data, cut by the data room's one feeder (``kdna_fx.data.image_batches``,
    strict): a tensor in ``batch_size`` batches (shuffled when a pass is given a generator), an iterable's batches
    as they come, in its own order; every batch moved to the model's device and dtype."""

    def __init__(self, data: Any, batch_size: int, device: torch.device, dtype: torch.dtype, dims: int = 2):
        self.data, self.batch_size, self.device, self.dtype, self.dims = data, batch_size, device, dtype, dims
        # One pass up front: every item is checked (and counted) before any mode changes the model.
        self.count = sum(x.shape[0] for x in self._checked(None))
        if self.count == 0:
            raise CalibrationError("calibrate: data is empty (the iterable yielded no batch); pass at least "
                                   "one image")

    def _checked(self, generator: torch.Generator | None) -> Iterator[Tensor]:
        """One pass of the data as given; the data room's DataError is calibrate's CalibrationError here."""
        try:
            stream, _ = image_batches(self.data, None, self.batch_size, generator, strict=True, dims=self.dims)
            yield from stream
        except DataError as exc:
            raise CalibrationError(f"calibrate: {exc}") from None

    def batches(self, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """One pass over the data; a tensor is shuffled when ``generator`` is given."""
        for x in self._checked(generator):
            yield x.to(device=self.device, dtype=self.dtype)

    def stream(self, generator: torch.Generator) -> Iterator[Tensor]:
        """Endless shuffled batches (epochs one after another), batches of one image skipped."""
        while True:
            for x in self.batches(generator):
                if x.shape[0] > 1:
                    yield x


def first_output(y: Any, who: str) -> Tensor:
    if isinstance(y, Tensor):
        return y
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], Tensor):
        return y[0]
    raise CalibrationError(f"calibrate: {who} returned a {type(y).__name__}; calibrate needs a tensor output "
                           f"(logits or a feature map)")


class Runner:
    def __init__(self, kmodel: nn.Module, reference: nn.Module, data: Batches):
        self.kmodel, self.reference, self.data = kmodel, reference, data
        self.ref_device, ref_dtype = device_dtype(reference)
        self.ref_dtype = ref_dtype or torch.get_default_dtype()

    @torch.no_grad()
    def ref(self, x: Tensor) -> Tensor:
        self.reference.eval()
        y = first_output(self.reference(x.to(device=self.ref_device, dtype=self.ref_dtype)), "the reference")
        return y.to(device=x.device, dtype=x.dtype)

    def logits_like(self, y: Tensor) -> bool:
        return y.dim() == 2

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, float]:
        """(top-1 agreement or None, relative RMS output error) of kmodel in eval mode over the data."""
        with KeptModes(self.kmodel):
            self.kmodel.eval()
            same = total = 0
            diff = norm = 0.0
            logits = True
            for x in self.data.batches():
                r, k = self.ref(x), first_output(self.kmodel(x), "kmodel")
                logits = logits and self.logits_like(r)
                if logits:
                    same += int((r.argmax(1) == k.argmax(1)).sum())
                total += x.shape[0]
                diff += float((k - r).double().pow(2).sum())
                norm += float(r.double().pow(2).sum())
        return (same / total if logits else None), (diff / max(norm, 1e-300)) ** 0.5

    def check_shapes(self) -> None:
        x = next(self.data.batches())[:2]
        try:
            r = self.ref(x)
        except (RuntimeError, ValueError) as e:
            raise CalibrationError(f"calibrate: the reference cannot run on the data (batch of shape "
                                   f"{tuple(x.shape)}): {e}") from e
        with KeptModes(self.kmodel), torch.no_grad():
            self.kmodel.eval()
            try:
                k = first_output(self.kmodel(x), "kmodel")
            except (RuntimeError, ValueError) as e:
                raise CalibrationError(f"calibrate: kmodel cannot run on the data (batch of shape "
                                       f"{tuple(x.shape)}): {e}") from e
        if k.shape != r.shape:
            raise CalibrationError(f"calibrate: the reference's output has shape {tuple(r.shape)} but kmodel's has "
                                   f"{tuple(k.shape)} on the same batch; reference must be the model kmodel was "
                                   f"transformed from")


def shared_tensors(kmodel: nn.Module, reference: nn.Module) -> list[str]:
    ref = {t.data_ptr() for t in list(reference.parameters()) + list(reference.buffers()) if t.numel()}
    named = list(kmodel.named_parameters()) + list(kmodel.named_buffers())
    return [n for n, t in named if t.numel() and t.data_ptr() in ref]
