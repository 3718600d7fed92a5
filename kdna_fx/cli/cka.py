"""``kdna cka SOURCE``: linear CKA between the outputs of a model's convs, as a heat map, a JSON matrix and a table.

SOURCE is a ``kdna train`` run directory, a state-dict file (.pt / .safetensors, with --model and its options),
a file written by ``kdna convert`` / kdna_fx.save (with --model: the original architecture), or a model name
(kdna_fx.models or torchvision; random weights seeded by --seed). ``--compare OTHER`` measures a second model
of the same kinds on the same images and draws the two maps side by side: the original against its
converted twin. Writes ``<out>/cka.png`` and ``<out>/cka.json`` and prints the most similar pairs.
"""
from __future__ import annotations

import argparse
import difflib
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import kdna_fx

from kdna_fx.cka import POOLS, CKAError, LayerSimilarity, layer_similarity
from kdna_fx.data import eval_images
from kdna_fx.errors import ConfigError, StateError
from kdna_fx.source import build_original, load_source, model_names, spec_from_options
from kdna_fx.state import FORMAT
from kdna_fx.timing import provenance
from kdna_fx.utils import write_json

from .options import add_data, add_model_options, add_progress


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdna cka", description=__doc__.splitlines()[0])
    p.add_argument("source", help="a `kdna train` run directory, a state dict (.pt / .safetensors), a kdna_fx.save "
                                  "file, or a model name (random weights)")
    add_model_options(p, what="the architecture")
    add_data(p, dataset_default=None)  # images to compare the layers on: the run's, else the Fashion-MNIST test split
    p.add_argument("--images", type=int, default=512, help="images to measure on (>= 4)")
    p.add_argument("--batch-size", type=int, default=64, help="images per minibatch of the CKA estimate (>= 4)")
    p.add_argument("--pool", choices=POOLS, default="flatten",
                   help="flatten: compare whole feature maps; mean: their spatial means (see docs/cka.md)")
    p.add_argument("--compare", default=None, help="a second model (same kinds as SOURCE, e.g. the output of "
                                                   "`kdna convert`) drawn beside the first")
    p.add_argument("--out", default=None, help="output folder (default: <run>/cka, <file>.cka or cka_<name>)")
    p.add_argument("--seed", type=int, default=0, help="image sample, and the weights of a model given by name")
    add_progress(p)
    return p


def _is_kdna_file(path: str) -> bool:
    """Whether ``path`` was written by kdna_fx.save (a transformed model, reloaded onto its original)."""
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - not readable as one: load_source says why
        return False


def _resolve(where: str, args: argparse.Namespace,
             like: dict[str, Any] | None = None) -> tuple[str, dict[str, Any], dict[str, Any], dict | None]:
    """(kind, model spec, data spec, state dict or None) of SOURCE, or of --compare when ``like`` (SOURCE's spec)
    is given: a weights file there belongs to SOURCE's architecture unless it is a run directory."""
    options = {"width": args.width, "small_stem": args.small_stem, "num_classes": args.num_classes}
    model = like["name"] if like else args.model
    flag = "--compare" if like else "SOURCE"
    if _is_kdna_file(where):
        if model is None:
            raise ConfigError(f"a kdna_fx.save file as {flag} needs --model NAME (the original architecture it was "
                              f"converted from) and its options")
        return "kdna", like or spec_from_options(model, **options), {}, None
    if os.path.isdir(where) or os.path.isfile(where):
        spec, data, state = load_source(where, None if like and os.path.isdir(where) else model, **options)
        kind = "run" if os.path.isdir(where) else "state"
        return kind, (like if like and kind == "state" else spec), data, state
    names = model_names()
    if where in names:
        if not like and args.model not in (None, where):
            raise ConfigError(f"SOURCE names the model {where!r} but --model says {args.model!r}; drop --model")
        return "name", {**(like or spec_from_options(where, **options)), "name": where}, {}, None
    close = difflib.get_close_matches(where, names, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(f"{flag} {where!r} is neither a `kdna train` run directory, a state-dict or kdna_fx.save file, "
                      f"nor a model name (kdna_fx.models.list_models() or a torchvision builder).{hint}")


def _build(kind: str, where: str, spec: dict[str, Any], state: dict | None, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the weights of a model given by name
    model = build_original(spec)
    if kind == "kdna":
        return kdna_fx.load(where, model)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            options = {k: v for k, v in spec.items() if k != "name"}
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            why = lines[1] if len(lines) > 1 else lines[0]  # the first line only says "Error(s) in loading"
            raise StateError(f"the weights in {where!r} do not fit {spec['name']} with options {options}: "
                             f"{why[:300]}. Give the options the model was trained with "
                             f"(--width, --small-stem, --num-classes).") from None
    return model.eval()


def _measure(model: nn.Module, name: str, data: Dataset, description: str, label: str,
             args: argparse.Namespace) -> LayerSimilarity:
    if len(data) == 0:  # type: ignore[arg-type]
        raise CKAError(f"{description} holds no images")
    probe = torch.stack([data[i][0] for i in range(min(2, len(data)))])  # type: ignore[arg-type]
    try:
        with torch.no_grad():
            model(probe)
    except RuntimeError as exc:  # the model's own forward failed: wrong data for this model
        raise CKAError(f"{name} cannot run on {description} (images {tuple(probe.shape[1:])}): "
                       f"{str(exc).splitlines()[0]}. Pick data the model was built for (--dataset, --data) or "
                       f"model options that fit it") from None
    sim = layer_similarity(model, data, images=args.images, pool=args.pool, batch_size=args.batch_size,
                           seed=args.seed, progress=args.progress)
    sim.label = label
    return sim


def _default_out(source: str, kind: str) -> str:
    if kind == "run":
        return os.path.join(source, "cka")
    if kind == "name":
        return f"cka_{source}"
    return f"{os.path.splitext(source.rstrip('/'))[0]}.cka"


def cka(args: argparse.Namespace) -> dict[str, Any]:
    kind, spec, data_spec, state = _resolve(args.source, args)
    data, classes, chans, description = eval_images(args.dataset or data_spec.get("dataset", "fashion-mnist"),
                                                    args.data_path or data_spec.get("path"),
                                                    image_size=args.image_size or data_spec.get("image_size"))
    if kind != "run":  # a run's spec is complete; the other sources take what the data implies
        spec = {**spec, "num_classes": args.num_classes or classes, "in_chans": chans}
    label = os.path.basename(args.source.rstrip("/"))
    sim = _measure(_build(kind, args.source, spec, state, args.seed), spec["name"], data, description, label, args)
    other = None
    if args.compare:
        okind, ospec, _, ostate = _resolve(args.compare, args, like=spec)
        model = _build(okind, args.compare, ospec, ostate, args.seed)
        other = _measure(model, ospec["name"], data, description, os.path.basename(args.compare.rstrip("/")), args)
    out = args.out or _default_out(args.source, kind)
    os.makedirs(out, exist_ok=True)
    png, path = os.path.join(out, "cka.png"), os.path.join(out, "cka.json")
    sim.plot(png, compare=other)

    def entry(where: str, s: LayerSimilarity) -> dict[str, Any]:
        return {"source": where, **s.to_dict(), "top_pairs": [list(p) for p in s.top_pairs()]}

    result = {**entry(args.source, sim), "model": spec, "data": description,
              "compare": entry(args.compare, other) if other is not None else None,
              "provenance": provenance(["kdna", "cka", *args.argv])}
    write_json(path, result)
    print(sim)
    if other is not None:
        print(f"\n{other}")
    print(f"\nwrote {png}, {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(argv or [])
    cka(args)
    return 0
