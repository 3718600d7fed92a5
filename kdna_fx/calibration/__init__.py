"""Label-free calibration of a transformed model against the trained model it came from.

    kmodel = kdna_fx.transform(trained)
    result = kdna_fx.calibrate(kmodel, images, reference=trained)      # CalibrationConfig() defaults
    result = kdna_fx.calibrate(kmodel, images, kdna_fx.CalibrationConfig(steps=100), reference=trained)
    print(result)                                                     # agreement and output error per mode

Modes, run in this order when several are asked:

- ``"bn"``: re-estimate the running statistics of every BatchNorm of ``kmodel`` on the data (cumulative
  average, only the BatchNorms in train mode, no gradients).
- ``"layerwise"``: child by child in graph order, fit that child's adapter (F, S, gate) so that its output,
  on the input the *kmodel* gives it, matches the output of the conv at the same path in ``reference`` on
  the reference's own input; BatchNorm statistics are re-estimated after every child.
- ``"distill"``: end-to-end distillation of ``kmodel``'s outputs to the reference's (KL divergence on
  logits with a temperature, mean squared error for any other output). ``train`` says what it trains:
  ``"adapters"`` (every adapter parameter and every norm's affine parameters), ``"parents"`` (those and
  the shared parent kernels) or ``"all"`` (every parameter). With ``"all"`` any student works, transformed
  or not (a pruned or factorised model distilled the same way, for a like-for-like comparison).

The reference is only read: it runs in eval mode under ``torch.no_grad`` and every module's training flag
is restored afterwards.

The room: ``config`` (CalibrationConfig, the report), ``feeder`` (batches and the runner), one module per mode
(``bn``, ``layerwise``, ``distill``); ``calibrate`` below runs them in order.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from kdna_fx.data import spatial_dims
from kdna_fx.datamodel import module_form, record_of
from kdna_fx.errors import CalibrationError, KDNAError, KDNATypeError
from kdna_fx.utils import KeptModes, device_dtype

from .bn import reestimate_bn
from .config import LAYER_LOSSES, MODES, TRAIN, CalibrationConfig, CalibrationReport, ModeResult
from .distill import distill_outputs, gram_loss
from .feeder import Batches, Runner, shared_tensors
from .layerwise import children_of, fit_children


def calibrate(kmodel: nn.Module, data: Any, config: CalibrationConfig | None = None, *,
              reference: nn.Module) -> CalibrationReport:
    """Calibrate a transformed model to the trained ``reference`` it came from, with unlabeled ``data``.

    ``data``: a tensor of images [N, C, H, W] (cut into ``config.batch_size`` batches, shuffled by
    ``config.seed``), or any iterable (a DataLoader) of image batches or (images, labels) tuples, used in its
    own order (labels are ignored). ``config``: a CalibrationConfig (None: its defaults, the measured recipe).
    ``kmodel`` is changed in place and its modules' train/eval flags are restored; ``reference`` is never
    changed. With ``config.train="all"`` any student works (a pruned or factorised model too). Returns a
    CalibrationReport.
    """
    if config is None:
        config = CalibrationConfig()
    if not isinstance(config, CalibrationConfig):
        raise KDNATypeError(f"calibrate: config must be a kdna_fx.CalibrationConfig, got {type(config).__name__} "
                            f"(options are its fields: calibrate(model, data, CalibrationConfig(steps=100), "
                            f"reference=original))")
    inner = module_form(kmodel) if isinstance(kmodel, nn.Module) else kmodel  # a graph form shares its tensors
    if not isinstance(inner, nn.Module):
        raise KDNATypeError(f"calibrate: kmodel must be an nn.Module, got {type(kmodel).__name__}")
    if config.train != "all" or "layerwise" in config.modes:
        try:
            record_of(inner)
        except KDNAError as exc:
            raise KDNAError(f"{exc}. calibrate(train={config.train!r}) and layerwise mode need a transformed "
                            f"model; to distill any other student (pruned, factorised) pass "
                            f"CalibrationConfig(train='all') with modes 'bn' and/or 'distill'") from None
    if not isinstance(reference, nn.Module):
        raise KDNATypeError(f"calibrate: reference must be the original trained nn.Module, got "
                            f"{type(reference).__name__}")
    if reference is inner:
        raise CalibrationError("calibrate: reference is kmodel itself (transform(..., inplace=True) changes and "
                               "returns the model you pass); pass the original model kmodel was transformed from: "
                               "transform without inplace=True, which leaves it as it was")
    shared = shared_tensors(inner, reference)
    if shared:
        raise CalibrationError(f"calibrate: kmodel shares {len(shared)} tensor(s) with reference (e.g. "
                               f"{shared[:3]}), as after transform(..., inplace=True); calibrating would change "
                               f"the reference. Transform without inplace=True")
    order = [m for m in MODES if m in config.modes]
    device, dtype = device_dtype(inner)
    feed = Batches(data, config.batch_size, device, dtype or torch.get_default_dtype(), spatial_dims(reference))
    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), KeptModes(reference):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        runner = Runner(inner, reference, feed)
        runner.check_shapes()
        agreement, error = runner.evaluate()
        results = []
        n_children = len(children_of(inner))
        for mode in order:
            total = {"bn": None, "layerwise": config.layerwise_steps * n_children, "distill": config.steps}[mode]
            with tqdm(total=total, desc=f"calibrate {mode}", disable=not config.progress, leave=False) as bar:
                start = time.perf_counter()
                children: dict[str, tuple[float, float]] = {}
                if mode == "bn":
                    done = reestimate_bn(inner, feed, bar)
                elif mode == "layerwise":
                    done, children = fit_children(inner, runner, feed, steps=config.layerwise_steps,
                                                lr=config.layerwise_lr, generator=generator, bar=bar)
                else:
                    done = distill_outputs(inner, runner, feed, config, generator=generator, bar=bar)
                seconds = time.perf_counter() - start
            after_agreement, after_error = runner.evaluate()
            results.append(ModeResult(mode, seconds, done, agreement, after_agreement, error, after_error, children))
            agreement, error = after_agreement, after_error
    return CalibrationReport(results, feed.count, config.seed, config)


__all__ = ["CalibrationConfig", "CalibrationReport", "LAYER_LOSSES", "MODES", "ModeResult", "TRAIN", "calibrate",
           "gram_loss"]
