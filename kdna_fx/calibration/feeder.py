"""Feeding calibration: image batches from a tensor or an iterable, and the runner that runs the model and its
reference on the same batch."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from kdna_fx.errors import CalibrationError
from kdna_fx.utils import KeptModes


def _images(item: Any, where: str) -> Tensor:
    if isinstance(item, (tuple, list)) and item:
        item = item[0]  # (images, labels, ...): labels are ignored
    if isinstance(item, dict):
        raise CalibrationError(f"calibrate: {where} is a dict; data must yield image tensors [N, C, H, W] or "
                               f"(images, labels) tuples")
    if not isinstance(item, Tensor):
        raise CalibrationError(f"calibrate: {where} is a {type(item).__name__}, not a tensor of images "
                               f"[N, C, H, W] (nor an (images, labels) tuple)")
    if item.dim() != 4:
        raise CalibrationError(f"calibrate: {where} has shape {tuple(item.shape)}; images must be a 4-D batch "
                               f"[N, C, H, W] (add the batch dimension with x.unsqueeze(0))")
    if not item.is_floating_point():
        raise CalibrationError(f"calibrate: {where} has dtype {item.dtype}; images must be floating point "
                               f"(convert with x.float() and the normalisation the model was trained with)")
    if item.shape[0] == 0:
        raise CalibrationError(f"calibrate: {where} is an empty batch (shape {tuple(item.shape)})")
    return item


class Batches:
    """Batches of images from a tensor (shuffled by our own generator) or from any iterable (its own order)."""

    def __init__(self, data: Any, batch_size: int, device: torch.device, dtype: torch.dtype):
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        if isinstance(data, Tensor):
            self.tensor: Tensor | None = _images(data, "data")
            self.iterable = None
            self.count = self.tensor.shape[0]
        else:
            if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
                raise CalibrationError(f"calibrate: data must be a tensor of images [N, C, H, W] or an iterable "
                                       f"(a DataLoader) of them, got {type(data).__name__}")
            self.tensor, self.iterable = None, data
            self.count = sum(b.shape[0] for b in self._iterate())
            if self.count == 0:
                raise CalibrationError("calibrate: data is empty (the iterable yielded no batch); pass at least "
                                       "one image")

    def _iterate(self) -> Iterator[Tensor]:
        for i, item in enumerate(self.iterable):  # type: ignore[union-attr]
            yield _images(item, f"data item #{i}")

    def _prepare(self, x: Tensor) -> Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    def batches(self, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """One pass over the data; a tensor is shuffled when ``generator`` is given."""
        if self.tensor is not None:
            order = (torch.randperm(self.count, generator=generator) if generator is not None
                     else torch.arange(self.count))
            for i in range(0, self.count, self.batch_size):
                yield self._prepare(self.tensor[order[i:i + self.batch_size]])
        else:
            for x in self._iterate():
                yield self._prepare(x)

    def stream(self, generator: torch.Generator) -> Iterator[Tensor]:
        """Endless shuffled batches (epochs one after another), batches of one image skipped."""
        while True:
            for x in self.batches(generator):
                if x.shape[0] > 1:
                    yield x


def floating_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


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
        self.ref_device, self.ref_dtype = floating_device_dtype(reference)

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
