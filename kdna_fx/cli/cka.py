"""``kdna cka SOURCE``: linear CKA between the outputs of a model's convs, as a heat map, a JSON matrix and a table.

SOURCE is a ``kdna train`` run directory, a state-dict file (.pt / .safetensors, with --model and its options),
a file written by ``kdna convert`` / kdna_fx.save (with --model: the original architecture), or a model name
(kdna_fx.models or torchvision; random weights seeded by --seed). ``--compare OTHER`` measures a second model
of the same kinds on the same images and draws the two maps side by side: the original against its
converted twin. Writes ``<out-dir>/cka.png`` and ``<out-dir>/cka.json`` and prints the most similar pairs.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset


from kdna_fx.cka import POOLS, CKAError, LayerSimilarity, layer_similarity
from kdna_fx.data import eval_images
from kdna_fx.source import resolve_source
from kdna_fx.timing import provenance
from kdna_fx.utils import write_json

from .options import add_batch_size, add_data, add_model_options, add_progress, data_spec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdna cka", description=__doc__.splitlines()[0])
    p.add_argument("source", help="a `kdna train` run directory, a state dict (.pt / .safetensors), a kdna_fx.save "
                                  "file, or a model name (random weights)")
    add_model_options(p, what="the architecture")
    add_data(p, dataset_default=None)  # images to compare the layers on: the run's, else the Fashion-MNIST test split
    p.add_argument("--images", type=int, default=512, help="images to measure on (>= 4)")
    add_batch_size(p, 64, "images per minibatch of the CKA estimate (>= 4)")
    p.add_argument("--pool", choices=POOLS, default="flatten",
                   help="flatten: compare whole feature maps; mean: their spatial means (see docs/cka.md)")
    p.add_argument("--compare", default=None, help="a second model (same kinds as SOURCE, e.g. the output of "
                                                   "`kdna convert`) drawn beside the first")
    p.add_argument("--out-dir", metavar="DIR", default=None,
                   help="the folder cka.png and cka.json go to (default: <run>/cka, <file>.cka or cka_<name>)")
    p.add_argument("--seed", type=int, default=0, help="image sample, and the weights of a model given by name")
    add_progress(p)
    return p


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


def _default_out(source: str) -> str:
    if os.path.isdir(source):  # a run
        return os.path.join(source, "cka")
    if not os.path.exists(source):  # a name
        return f"cka_{source}"
    return f"{os.path.splitext(source.rstrip('/'))[0]}.cka"


def cka(args: argparse.Namespace) -> dict[str, Any]:
    options = {"width": args.width, "small_stem": args.small_stem, "num_classes": args.num_classes}
    source = resolve_source(args.source, args.model, **options)
    data_set = data_spec(args, source.data)
    data, classes, chans, description = eval_images(data_set.dataset, data_set.root, image_size=data_set.image_size)
    source = source.fit(num_classes=args.num_classes or classes, in_chans=args.in_chans or chans)
    spec = source.spec
    label = os.path.basename(args.source.rstrip("/"))
    sim = _measure(source.build(args.seed), spec.name, data, description, label, args)
    other = None
    if args.compare:
        compare = resolve_source(args.compare, args.model, like=spec, **options)
        other = _measure(compare.build(args.seed), compare.spec.name, data, description,
                         os.path.basename(args.compare.rstrip("/")), args)
    out = args.out_dir or _default_out(args.source)
    os.makedirs(out, exist_ok=True)
    png, path = os.path.join(out, "cka.png"), os.path.join(out, "cka.json")
    sim.plot(png, compare=other)

    def entry(where: str, s: LayerSimilarity) -> dict[str, Any]:
        return {"source": where, **s.to_dict(), "top_pairs": [list(p) for p in s.top_pairs()]}

    result = {**entry(args.source, sim), "model": spec.to_dict(), "data": description,
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
