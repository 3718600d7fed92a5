"""Coverage of models from other libraries: what kdna_fx.transform does to each, with example inputs.

Each model of bench.thirdparty (segmentation-models-pytorch, MONAI, Ultralytics, Hugging Face
transformers, efficientnet-pytorch, torchvision quantizable and detection models, timm), built without weights,
goes through ``kdna_fx.transform(model, config, example_inputs=...)`` with the config the test sweep uses
(``bench.thirdparty.config``: the default but where the catalogue says otherwise). The table gives the
outcome (shared or unchanged, and why nothing was shared), the
parameters before and after, the families, and the largest output difference of the function-preserving
transform (every conv shared at full rank, init="trained") against the original. tests/test_thirdparty_sweep.py
checks the same outcomes; docs/partial-tracing.md#coverage shows this table.

    .venv/bin/python -m bench.library_coverage     # about 3 minutes on 2 cores

It also lists torchvision's detection, segmentation and optical-flow builders, transformed without example
inputs as tests/test_dense_sweep.py does.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
import warnings
from typing import Any

import torch
from tqdm import tqdm

import kdna_fx
from kdna_fx import KDNAConfig
from kdna_fx.datamodel import record_of
from bench import thirdparty as catalogue
from bench.common import DirtyTreeError, run_provenance
from kdna_fx.testing import output_tensors
from kdna_fx.timing import markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "coverage")


def _changed(config: KDNAConfig) -> dict[str, Any]:
    """The fields of ``config`` that differ from the default's."""
    default = KDNAConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(default, f.name)}


def _eval(model: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return output_tensors(model.eval()(*inputs))


def _why(record: Any) -> str:
    """When nothing was shared, the two commonest reasons its convs were left alone."""
    if record.plan.families:
        return ""
    reasons: dict[str, int] = {}
    for s in record.plan.skipped:
        key = s.reason.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:2])


def _image(size: int = 64) -> tuple:
    return (torch.randn(2, 3, size, size),)


def _held_out() -> dict[str, tuple[str, Any, Any]]:
    """Models kept out of the test sweep on purpose (issue 23: "other models ... give the same outcome classes"):
    id -> (distribution, builder, example inputs). Nothing here was tuned on; a crash is a row, not a stop."""
    def smp(arch: str, encoder: str = "resnet18") -> Any:
        import segmentation_models_pytorch as smp_
        return lambda: getattr(smp_, arch)(encoder_name=encoder, encoder_weights=None, classes=2)

    def monai(name: str, **kwargs: Any) -> Any:
        def build() -> torch.nn.Module:
            import monai.networks.nets as nets
            return getattr(nets, name)(spatial_dims=2, in_channels=3, out_channels=2, **kwargs)
        return build

    def yolo(cfg: str) -> Any:
        def build() -> torch.nn.Module:
            from ultralytics.nn import tasks
            cls = {"seg": tasks.SegmentationModel, "pose": tasks.PoseModel}.get(cfg.split("-")[-1].split(".")[0],
                                                                                tasks.DetectionModel)
            return cls(cfg, verbose=False)
        return build

    def hf(config: str, model: str, **kwargs: Any) -> Any:
        def build() -> torch.nn.Module:
            import transformers
            return getattr(transformers, model)(getattr(transformers, config)(**kwargs))
        return build

    def effnet(name: str) -> Any:
        def build() -> torch.nn.Module:
            from efficientnet_pytorch import EfficientNet
            return EfficientNet.from_name(name, num_classes=10)
        return build

    def timm_model(name: str) -> Any:
        def build() -> torch.nn.Module:
            import timm
            return timm.create_model(name, pretrained=False, num_classes=10)
        return build

    image = lambda size=64: (lambda: _image(size))  # noqa: E731
    return {
        "smp-linknet-resnet34": ("segmentation-models-pytorch", smp("Linknet", "resnet34"), image()),
        "smp-pspnet-resnet18": ("segmentation-models-pytorch", smp("PSPNet"), image()),
        "smp-manet-resnet18": ("segmentation-models-pytorch", smp("MAnet"), image()),
        "smp-pan-resnet18": ("segmentation-models-pytorch", smp("PAN"), image(128)),  # its pyramid pools to 1/32
        "smp-upernet-resnet18": ("segmentation-models-pytorch", smp("UPerNet"), image()),
        "monai-attentionunet": ("monai", monai("AttentionUnet", channels=(8, 16, 32, 64), strides=(2, 2, 2)),
                                image()),
        "monai-basicunetplusplus": ("monai", monai("BasicUNetPlusPlus", features=(8, 8, 16, 32, 64, 8)), image()),
        "monai-segresnetvae": ("monai", lambda: __import__("monai.networks.nets", fromlist=["SegResNetVAE"])
                               .SegResNetVAE(input_image_size=(64, 64), spatial_dims=2, in_channels=3,
                                             out_channels=2, init_filters=8), image()),
        "ultralytics-yolov8n-seg": ("ultralytics", yolo("yolov8n-seg.yaml"), image()),
        "ultralytics-yolov8n-pose": ("ultralytics", yolo("yolov8n-pose.yaml"), image()),
        "ultralytics-yolov5nu": ("ultralytics", yolo("yolov5nu.yaml"), image()),
        "hf-bit-cls": ("transformers", hf("BitConfig", "BitForImageClassification", embedding_size=64,
                                          hidden_sizes=[128, 256, 512, 1024], depths=[1, 1, 1, 1], num_labels=4),
                       image()),
        "hf-efficientnet-cls": ("transformers", hf("EfficientNetConfig", "EfficientNetForImageClassification",
                                                   width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280,
                                                   num_labels=4),
                                image()),
        "hf-resnet50-cls": ("transformers", hf("ResNetConfig", "ResNetForImageClassification", embedding_size=16,
                                               hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2],
                                               layer_type="bottleneck", num_labels=4), image()),
        "effnet-pytorch-b1": ("efficientnet-pytorch", effnet("efficientnet-b1"), image()),
        "timm-resnet34d": ("timm", timm_model("resnet34d"), image()),
        "timm-regnety_002": ("timm", timm_model("regnety_002"), image()),
        "timm-cspresnet50": ("timm", timm_model("cspresnet50"), image()),
    }


def measure_held_out() -> list[dict[str, Any]]:
    rows = []
    for name, (library, build, inputs) in tqdm(_held_out().items(), desc="held out"):
        try:  # the model itself must build and run on its inputs, or the row says so and kdna_fx is not judged
            torch.manual_seed(0)
            _eval(build(), inputs())
        except Exception as exc:  # noqa: BLE001
            rows.append({"model": name, "library": library, "outcome": "does not run without kdna_fx",
                         "held_out": True, "why": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        try:
            rows.append({**measure(name, build, inputs, library), "held_out": True})
        except Exception as exc:  # noqa: BLE001 - recorded: the point is to see every outcome class
            rows.append({"model": name, "library": library, "outcome": "crash", "held_out": True,
                         "why": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return rows


def measure(name: str, build: Any = None, example: Any = None, library: str | None = None) -> dict[str, Any]:
    """One model's row: a catalogue model, or ``build`` with ``example`` inputs."""
    torch.manual_seed(0)
    model = (build or catalogue.BUILDERS[name])().eval()
    inputs = (example or catalogue.EXAMPLE_INPUTS[name])()
    config = catalogue.config(name) if build is None else KDNAConfig()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kmodel = kdna_fx.transform(model, config, example_inputs=inputs)
    seconds = time.perf_counter() - start
    record = record_of(kmodel)
    plan = record.plan
    unchanged = not plan.families
    row = {"model": name, "library": library or catalogue.LIBRARY[name], "outcome": "unchanged" if unchanged else "shared",
           "params_before": sum(p.numel() for p in model.parameters()),
           "params_after": sum(p.numel() for p in kmodel.parameters()),
           "families": len(plan.families), "children": len(plan.children), "transform_s": seconds,
           "config": _changed(config),
           "why": _why(record), "warnings": sorted({w.category.__name__ for w in caught})}
    if unchanged:
        return row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preserved = kdna_fx.transform(model, catalogue.preserving(config), init="trained", example_inputs=inputs)
    expected, got = _eval(model, inputs), _eval(preserved, inputs)
    out = _eval(kmodel, inputs)
    row["finite"] = bool(out) and all(bool(torch.isfinite(t).all()) for t in out)
    row["preserving_max_rel_diff"] = max(float((g - e).abs().max()) / max(1.0, float(e.abs().max()))
                                         for e, g in zip(expected, got))
    return row


def measure_torchvision_dense() -> list[dict[str, Any]]:
    """torchvision's 2-D detection, segmentation and optical-flow builders (3 classes, weights=None), transformed
    as tests/test_dense_sweep.py does (no example inputs: their forwards take lists of images and targets)."""
    import torchvision
    from torchvision.models import detection, optical_flow, segmentation

    rows = []
    names = [(n, m) for m in (detection, segmentation, optical_flow) for n in torchvision.models.list_models(module=m)]
    for name, module in tqdm(names, desc="torchvision dense"):
        kwargs = {} if module is optical_flow else dict(weights=None, weights_backbone=None, num_classes=3)
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kmodel = kdna_fx.transform(model)
        record = record_of(kmodel)
        shared = bool(record.plan.families)
        rows.append({"model": name, "library": "torchvision", "outcome": "shared" if shared else "unchanged",
                     "params_before": sum(p.numel() for p in model.parameters()),
                     "params_after": sum(p.numel() for p in kmodel.parameters()), "families": len(record.plan.families),
                     "children": len(record.plan.children), "why": _why(record)})
        del model, kmodel
    return rows


def main(argv: list[str] | None = None) -> None:
    try:  # read at the start: the commit that runs, and only a clean tree writes into bench/results
        prov = run_provenance(["-m", "bench.library_coverage", *(argv or [])], out=OUT)
    except DirtyTreeError as exc:
        raise SystemExit(str(exc)) from None
    torch.set_num_threads(min(2, len(os.sched_getaffinity(0))))
    rows = []
    for name in tqdm(sorted(catalogue.BUILDERS), desc="library coverage"):
        try:
            importlib.import_module(catalogue.MODULE[name])
        except ImportError:
            rows.append({"model": name, "library": catalogue.LIBRARY[name], "outcome": "not installed"})
            continue
        rows.append(measure(name))
    rows += measure_held_out()
    rows += measure_torchvision_dense()
    for r in rows:
        if r.get("params_before"):
            r["change_pct"] = 100 * (r["params_after"] / r["params_before"] - 1)
    libraries = {lib: _version(lib) for lib in sorted({r["library"] for r in rows})}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "libraries.json"), "w") as f:
        json.dump({"provenance": prov, "versions_libraries": libraries, "rows": rows}, f, indent=1)
    table = [[r["model"] + (" (held out)" if r.get("held_out") else ""), r["outcome"], f"{r.get('params_before', 0):,}",
              f"{r.get('params_after', 0):,}",
              f"{r['change_pct']:+.1f} %" if "change_pct" in r else "-",
              f"{r.get('families', 0)} / {r.get('children', 0)}",
              ", ".join(f"{k}={v}" for k, v in r.get("config", {}).items()) or "default",
              f"{r['preserving_max_rel_diff']:.1e}" if "preserving_max_rel_diff" in r else "-",
              r.get("why", "")] for r in rows]
    md = ["# kdna_fx on models from other libraries", "",
          f"Command: `{prov['command']}`; commit {prov['git']['commit']} (clean tree); {prov['machine']['cpu']}; "
          f"torch {prov['versions']['torch']}; " + ", ".join(f"{k} {v}" for k, v in libraries.items()), "",
          "`transform(model, config, example_inputs=...)` with the config shown (bench.thirdparty.CONFIGS), "
          "which returns the model itself (its class kept), children in its module tree; *why*: the reason nothing "
          "was shared. *preserving*: largest output difference, relative to the largest output, of the same "
          "config with `only_if_smaller=False, adapter=AdapterConfig(rank='full')` and `init='trained'` against "
          "the original (float32). "
          "*(held out)*: models kept out of tests/test_thirdparty_sweep.py, run once here; the torchvision "
          "detection, segmentation and flow rows are transformed without example inputs, as tests/test_dense_sweep.py "
          "does, and have no preserving check.", "",
          markdown_table(["model", "outcome", "params before", "after", "change", "families / children", "config",
                          "preserving", "why"], table)]
    with open(os.path.join(OUT, "libraries.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main(sys.argv[1:])
