"""Speed suite (issue 8): KernelDNA against its baselines and its peers, eager and compiled, at every batch size.

    .venv/bin/python -m bench.speed                                  # every group, CPU defaults
    .venv/bin/python -m bench.speed --groups resnet18 --batches 1 8 32 --train
    .venv/bin/python -m bench.speed --report                         # tables and plot from what is on disk

A *group* is one network and its variants, timed together in one process with the rows interleaved
(kdna_fx.timing.time_interleaved), so that a slow phase of a shared machine lands on every row:

Every row's model is a zoo name with its tag and ``create_model`` options (``GROUPS``: ``torchvision/resnet18``,
``torchvision/resnet18.replace``, ``resnet18.kdna``, ``torchvision/resnet18.odconv`` ...), folded where the row says so:

- ``resnet18``: torchvision ResNet-18; ``kdna_fx.transform`` of it (replace mode) and its folded form; the
  reference topology ``resnet18.kdna`` (folded); CondConv (K=4), DY-Conv (K=4), ODConv 1x and KernelWarehouse 1x
  (the paper's layers: 3x3 and 1x1 convs) on the same net.
- ``resnet50``: ResNet-50, replace mode, folded, the reference ``kdna_resnet50`` (folded).
- ``mobilenet_v2``: MobileNetV2, replace mode with its 1x1 sharing (kdna_fx.models.sharing_config), folded.
- ``unet3d_32``, ``unet3d_64`` (issue 32): the catalogue's MONAI 3-D UNet (bench.thirdparty
  ``monai-unet-3d``) on 1x32^3 and 1x64^3 volumes, replace mode and folded; ``r3d_18``: torchvision's r3d_18 on
  3x8x64x64 clips, the same. Their inputs are ``INPUTS[group]`` (``--image-size`` is for the 2-D groups); run
  them with ``--groups unet3d_32 unet3d_64 r3d_18 --modes inductor --batches 1 4 --threads 1``.

Modes: ``eager``, ``inductor`` (torch.compile) and ``freezing`` (torch.compile with Inductor's freezing:
parameters become constants, so an unfolded model's kernels are folded by the compiler and CPU convs use
pre-packed weights). Compiled rows are compiled with static shapes, one graph per batch size (the fastest
code Inductor makes, and what a server with a fixed batch runs); separately, one ``torch.compile(dynamic=True)``
per row is called at every batch size and the graphs it needed are counted against the baseline's. Per
(mode, batch): median latency, images/s and the spread of every row; per row: compile time and peak memory of
one forward. ``--train``: one SGD training step (forward + backward + step) at the largest batch, eager and
compiled. ``--variants channels_last bf16`` adds those inference variants at the largest batch.

Targets (issue 8) are evaluated in the report: replace mode (best of unfolded and folded) at >= 0.97 of the
baseline in the same compiled mode; reference topologies at >= 0.95 of their MAC bound (the baseline's
throughput times baseline MACs / model MACs); KernelDNA >= 3x ODConv 1x at batch 32 and >= 1.5x at batch 1;
compiled training step faster than eager; no graph beyond the baseline's with a dynamic batch. Issue 25 adds bf16:
replace mode at >= 0.95 of the baseline under bf16 autocast (``--variants bf16``; bench/bf16_profile.py judges
every batch with the same rule, ``bf16_target``), and with ``--train --train-amp bf16`` (meant for the GPU) a
compiled training step of replace mode at >= 0.9 of the baseline's speed.

Writes bench/results/speed/<group>_<device>.json (the timings), <group>_<device>_variants.json and _train.json
(one file per part: rerunning a part replaces only it) and
speed_<device>.{md,png} built from all groups on disk, each with the exact command, machine and versions.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

import kdna_fx
from kdna_fx import peers
from kdna_fx.models import create_model, sharing_config
from kdna_fx.reporting import count_macs
from kdna_fx.timing import time_interleaved
from kdna_fx.utils import write_json

from bench.common import run_provenance
from bench.speed_report import report

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "speed")
MODES = ("eager", "inductor", "freezing", "cudagraphs")
"""cudagraphs: Inductor with CUDA graphs (``mode="reduce-overhead"``); on a CPU it is plain Inductor."""


@dataclasses.dataclass
class Zoo:
    """A row's model: ``kdna_fx.models.create_model(name, **options)``, the one resolver (a torchvision model as
    ``torchvision/<name>[.<tag>]``), folded for deployment (eval mode, ``kdna_fx.fold``) when ``fold``."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    fold: bool = False

    def __call__(self) -> nn.Module:
        model = create_model(self.name, **self.options)
        return kdna_fx.fold(model.eval()) if self.fold else model


def _zoo(name: str, *, fold: bool = False, **options: Any) -> Zoo:
    return Zoo(name, options, fold)


@dataclasses.dataclass
class Catalogue:
    """A row's model from bench.thirdparty (``name``), transformed by ``config`` unless it is None,
    folded for deployment when ``fold``."""

    name: str
    config: kdna_fx.KDNAConfig | None = None
    fold: bool = False

    def __call__(self) -> nn.Module:
        from bench import thirdparty

        model = thirdparty.BUILDERS[self.name]().eval()
        if self.config is not None:
            model = kdna_fx.transform(model, self.config, example_inputs=thirdparty.EXAMPLE_INPUTS[self.name]())
        return kdna_fx.fold(model.eval()) if self.fold else model


def _catalogue_rows(name: str) -> list[tuple[str, Catalogue, str]]:
    """Baseline, replace mode and replace mode folded of one catalogue network."""
    return [(name, Catalogue(name), "baseline"), ("replace", Catalogue(name, kdna_fx.KDNAConfig()), "replace"),
            ("replace folded", Catalogue(name, kdna_fx.KDNAConfig(), fold=True), "folded")]


def _sharing(name: str, rewrite: str = "auto") -> kdna_fx.KDNAConfig:
    """The architecture's sharing config (kdna_fx.models.sharing_config) with the given rewrite path."""
    return dataclasses.replace(sharing_config(name), rewrite=rewrite)


# Each row: (name, builder, role). Roles: baseline (the group's reference), replace / folded (KernelDNA in
# replace mode), graph / graph folded (the same model's graph form, passes.lower), reference (a KernelDNA
# reference topology), peer. Every builder is a zoo name with its tag and create_model options.
GROUPS: dict[str, list[tuple[str, Zoo, str]]] = {
    "resnet18": [
        ("resnet18", _zoo("torchvision/resnet18"), "baseline"),
        ("replace", _zoo("torchvision/resnet18.replace", config=_sharing("resnet18")), "replace"),
        ("replace folded", _zoo("torchvision/resnet18.replace", fold=True, config=_sharing("resnet18")), "folded"),
        ("kdna_resnet18 folded", _zoo("resnet18.kdna", fold=True), "reference"),
        ("CondConv K=4", _zoo("torchvision/resnet18.condconv", experts=4), "peer"),
        ("DY-Conv K=4", _zoo("torchvision/resnet18.dyconv", kernels=4), "peer"),
        ("ODConv 1x", _zoo("torchvision/resnet18.odconv", kernel_num=1), "peer"),
        ("KernelWarehouse 1x", _zoo("torchvision/resnet18.kernelwarehouse", ratio=1,
                                    config=kdna_fx.KDNAConfig(kernel_sizes=(1, 3))), "peer"),
    ],
    "resnet50": [
        ("resnet50", _zoo("torchvision/resnet50"), "baseline"),
        ("replace", _zoo("torchvision/resnet50.replace", config=_sharing("resnet50")), "replace"),
        ("replace folded", _zoo("torchvision/resnet50.replace", fold=True, config=_sharing("resnet50")), "folded"),
        ("kdna_resnet50 folded", _zoo("resnet50.kdna", fold=True), "reference"),
    ],
    # The transformed model (children are modules in the user's tree) against its graph form (passes.lower,
    # rewrite="graph": the design card's FX graph): "replace" is compared with role "graph", "folded" with
    # "graph folded".
    "swap": [
        ("resnet18", _zoo("torchvision/resnet18"), "baseline"),
        ("replace", _zoo("torchvision/resnet18.replace", config=_sharing("resnet18")), "replace"),
        ("replace, graph form", _zoo("torchvision/resnet18.replace", config=_sharing("resnet18", "graph")), "graph"),
        ("replace folded", _zoo("torchvision/resnet18.replace", fold=True, config=_sharing("resnet18")), "folded"),
        ("replace folded, graph form",
         _zoo("torchvision/resnet18.replace", fold=True, config=_sharing("resnet18", "graph")), "graph folded"),
    ],
    "mobilenet_v2": [
        ("mobilenet_v2", _zoo("torchvision/mobilenet_v2"), "baseline"),
        ("replace", _zoo("torchvision/mobilenet_v2.replace", config=_sharing("mobilenet_v2")), "replace"),
        ("replace folded", _zoo("torchvision/mobilenet_v2.replace", fold=True, config=_sharing("mobilenet_v2")),
         "folded"),
    ],
    "unet3d_32": _catalogue_rows("monai-unet-3d"),
    "unet3d_64": _catalogue_rows("monai-unet-3d"),
    "r3d_18": [("r3d_18", _zoo("torchvision/r3d_18"), "baseline"),
               ("replace", _zoo("torchvision/r3d_18.replace"), "replace"),
               ("replace folded", _zoo("torchvision/r3d_18.replace", fold=True), "folded")],
}
INPUTS: dict[str, tuple[int, ...]] = {"unet3d_32": (1, 32, 32, 32), "unet3d_64": (1, 64, 64, 64),
                                      "r3d_18": (3, 8, 64, 64)}
"""One sample's shape per group that does not take ``--image-size`` RGB images."""


def example(group: str, batch: int, args: argparse.Namespace, device: torch.device | str = "cpu") -> torch.Tensor:
    """A random input batch of ``group``: its INPUTS shape, else ``--image-size`` RGB images."""
    return torch.randn(batch, *INPUTS.get(group, (3, args.image_size, args.image_size)), device=device)


@contextlib.contextmanager
def inductor_freezing(on: bool):
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=on):
        yield


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was live before it (activations and
    workspaces; parameters excluded): CUDA's allocator statistics, on CPU the profiler's allocation events
    (which miss the buffers of a compiled graph: the suite measures eager memory only there)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each allocation is charged to the op that made it (its self memory; an allocation outside any op, such
    # as a compiled graph's own buffers, is a "[memory]" event of its own), each free is a negative
    # "[memory]" event: the running sum in time order peaks at the peak.
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    return count_macs(model, x)[0]  # one counter for every role: a peer's per-sample conv counts as the conv


def run_group(group: str, args: argparse.Namespace,
              device: torch.device) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """Build, compile and time one group; returns its JSON payload and its models."""
    sync = sync_of(device)
    torch.manual_seed(0)
    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}
    for name, build, role in tqdm(GROUPS[group], desc=f"{group}: build", leave=False):
        model = build().eval()
        rows[name] = {"role": role, "params": sum(p.numel() for p in model.parameters()),
                      "macs": _macs(model, example(group, 1, args))}
        models[name] = model.to(device)
    inputs = {b: example(group, b, args, device) for b in args.batches}
    timings: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        torch._dynamo.reset()
        with inductor_freezing(mode == "freezing"), torch.inference_mode():
            for b in tqdm(args.batches, desc=f"{group}: {mode}", leave=False):
                calls = {}
                for name, model in models.items():
                    # Static shapes, one graph per batch size: what a server with a fixed batch runs, and
                    # Inductor's fastest CPU code (a dynamic batch costs every row, the baseline included).
                    start = time.perf_counter()
                    fn = model if mode == "eager" else _compile(model, args.backend, dynamic=False,
                                                                 cudagraphs=mode == "cudagraphs")
                    fn(inputs[b])
                    if mode != "eager":
                        compile_s = rows[name].setdefault("compile_s", {}).setdefault(mode, {})
                        compile_s[str(b)] = time.perf_counter() - start
                    # On CPU the profiler does not see a compiled graph's own buffers: eager memory only there.
                    if b == min(args.batches) and (mode == "eager" or device.type == "cuda"):
                        rows[name].setdefault("peak_bytes", {})[mode] = peak_memory(lambda: fn(inputs[b]))
                    calls[name] = lambda fn=fn, x=inputs[b]: fn(x)
                repeat = max(1, args.repeat // b) if b > 1 else args.repeat
                timed = time_interleaved(calls, warmup=2, repeat=repeat, rounds=args.rounds, sync=sync)
                for name, t in timed.items():
                    t["images_per_s"] = b / t["median_s"]
                    timings.setdefault(mode, {}).setdefault(str(b), {})[name] = t
    if "inductor" in args.modes:  # the peers' per-sample grouped convs are known to need a graph per batch size
        _count_graphs({n: m for n, m in models.items() if rows[n]["role"] != "peer"}, inputs, rows)
    return {"group": group, "device": device.type, "image_size": args.image_size,
            "input": list(INPUTS.get(group, (3, args.image_size, args.image_size))), "rows": rows, "timings": timings,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}, models


def _compile(model: nn.Module, backend: str, dynamic: bool | None = None, cudagraphs: bool = False) -> Any:
    """torch.compile with ``backend`` (Inductor, or a cheaper one for dry runs); CUDA graphs are Inductor's."""
    if backend != "inductor":
        return torch.compile(model, backend=backend, dynamic=dynamic)
    return torch.compile(model, dynamic=dynamic, mode="reduce-overhead" if cudagraphs else None)


def _count_graphs(models: dict[str, nn.Module], inputs: dict[int, torch.Tensor], rows: dict[str, Any]) -> None:
    """One ``torch.compile(dynamic=True)`` per row, called at every batch size: the graphs it needed.

    Dynamo specialises batch 1 (its 0/1 rule), and torch's own convolution adds a guard of its own, so the
    plain baseline needs more than one graph too; what a transform must not do is add graphs to it.
    """
    with torch.inference_mode():
        for name, model in tqdm(models.items(), desc="graphs across batch sizes", leave=False):
            torch._dynamo.reset()
            before = _graphs()
            fn = torch.compile(model, dynamic=True)
            for b in sorted(inputs, reverse=True):  # largest first: the first graph is the dynamic one
                fn(inputs[b])
            rows[name]["graphs_dynamic"] = _graphs() - before


def _variants(models: dict[str, nn.Module], x: torch.Tensor, args: argparse.Namespace,
              sync: Callable[[], None] | None) -> dict[str, Any]:
    """fp32 against channels_last and bf16 (autocast) inference, compiled with freezing, at one batch."""
    out: dict[str, Any] = {}
    torch._dynamo.reset()
    with inductor_freezing(True), torch.inference_mode():
        calls = {}
        for name, model in models.items():
            for variant in ("fp32", *args.variants):
                m = _memory_format(model, torch.channels_last) if variant == "channels_last" else model
                xx = x.to(memory_format=torch.channels_last) if variant == "channels_last" else x
                c = _compile(m, args.backend)
                if variant == "bf16":
                    def call(c=c, xx=xx):
                        with torch.autocast(x.device.type, dtype=torch.bfloat16):
                            return c(xx)
                else:
                    def call(c=c, xx=xx):
                        return c(xx)
                call()
                calls[f"{name} | {variant}"] = call
            _memory_format(model, torch.contiguous_format)
        timed = time_interleaved(calls, warmup=1, repeat=2, rounds=args.rounds, sync=sync)
    for key, t in timed.items():
        name, _, variant = key.partition(" | ")
        out.setdefault(name, {})[variant] = dict(t, images_per_s=x.shape[0] / t["median_s"])
    return out


def _memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """``model`` with its 4-D tensors in ``memory_format``, in place. Module.to(memory_format=) refuses the peers'
    5-D expert kernels ([K, C_out, C_in, k, k]), which stay as they are."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=memory_format)
    return model


def _train_steps(group: str, args: argparse.Namespace, device: torch.device,
                 sync: Callable[[], None] | None) -> dict[str, Any]:
    """One SGD step (forward, backward, step) at ``--train-batch`` (default: the largest batch), eager and
    compiled, per trainable row; under bf16 autocast with ``--train-amp bf16``."""
    b = args.train_batch or max(args.batches)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.train_amp == "bf16"
           else contextlib.nullcontext())
    x = example(group, b, args, device)
    y = torch.randint(0, 1000, (b,), device=device)
    out: dict[str, Any] = {}
    torch._dynamo.reset()
    for name, build, role in GROUPS[group]:
        if role in ("folded", "graph folded") or (args.train_rows and name not in args.train_rows):
            continue  # a folded model is for inference only
        if role == "reference":
            build = dataclasses.replace(build, fold=False)  # the unfolded reference trains
        model = build().to(device).train()
        for mode in ("eager", "inductor"):
            step_model = _compile(model, args.backend) if mode == "inductor" else model
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step(m=step_model, opt=opt):
                opt.zero_grad(set_to_none=True)
                with amp:
                    loss = nn.functional.cross_entropy(m(x), y)
                loss.backward()
                opt.step()
            start = time.perf_counter()
            with torch.enable_grad():
                step()
                compile_s = time.perf_counter() - start
                samples = []
                for _ in range(args.train_repeat):
                    t0 = time.perf_counter()
                    step()
                    if sync:
                        sync()
                    samples.append(time.perf_counter() - t0)
            samples.sort()
            out.setdefault(name, {})[mode] = {"median_s": samples[len(samples) // 2], "min_s": samples[0],
                                              "max_s": samples[-1], "first_call_s": compile_s}
    return out


def sync_of(device: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.type == "cuda" else None


def save_and_say(path: str, payload: dict[str, Any]) -> None:
    write_json(path, payload)
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--modes", nargs="+", default=list(MODES[:3]), choices=MODES)
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8 32 (and 128 on a GPU)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeat", type=int, default=8, help="calls per round at batch 1 (fewer at larger batches)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--train", action="store_true", help="also time one training step at the largest batch")
    p.add_argument("--train-repeat", type=int, default=3)
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend of the compiled rows (aot_eager: the quick dry run of bench/gpu_check.py)")
    p.add_argument("--train-batch", type=int, default=None, help="batch of the --train step (default: the largest)")
    p.add_argument("--train-amp", choices=("none", "bf16"), default="none", help="autocast of the --train step")
    p.add_argument("--train-rows", nargs="+", default=None, metavar="ROW",
                   help="rows whose training step is timed (default: every row but the folded ones)")
    p.add_argument("--variants", nargs="*", default=[], choices=("channels_last", "bf16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=OUT)
    p.add_argument("--no-timing", action="store_true", help="only the --train and --variants parts")
    p.add_argument("--report", action="store_true", help="only rebuild the tables and plot from disk")
    args = p.parse_args(argv)
    if args.no_timing and not (args.train or args.variants):
        p.error("--no-timing leaves nothing to run: add --train or --variants")
    if args.batches is None:
        args.batches = [1, 8, 32, 128] if args.device == "cuda" else [1, 8, 32]
    if any(b < 1 for b in args.batches):
        p.error(f"--batches must be positive, got {args.batches}")
    os.makedirs(args.out, exist_ok=True)
    if args.report:
        print(report(args.out, args.device, GROUPS))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meta = {"provenance": run_provenance(sys.argv if argv is None else ["bench/speed.py", *argv], out=args.out)}
    # Every row of a group is compiled at every batch size: more graphs than Dynamo's default limit, and a row
    # that hit it would silently run eagerly. Patched, not set, so a caller (the tests) keeps its own config.
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096,
                                    fail_on_recompile_limit_hit=True):
        _run_groups(args, device, meta)
    print(report(args.out, device.type, GROUPS))


def _run_groups(args: argparse.Namespace, device: torch.device, meta: dict[str, Any]) -> None:
    batch = max(args.batches)
    for group in args.groups:
        # One file per part, so that rerunning one part (say, the timings with more rounds) replaces only it.
        stem = os.path.join(args.out, f"{group}_{device.type}")
        models = None
        if not args.no_timing:
            payload, models = run_group(group, args, device)
            save_and_say(f"{stem}.json", {**payload, **meta})
        if args.variants:
            if models is None:
                models = {name: build().eval().to(device) for name, build, _ in GROUPS[group]}
            x = example(group, batch, args, device)
            save_and_say(f"{stem}_variants.json", {"batch": batch, "variants": _variants(models, x, args, sync_of(device)),
                                            **meta})
        models = None
        if args.train:
            save_and_say(f"{stem}_train.json", {"batch": args.train_batch or batch, "amp": args.train_amp,
                                         "train": _train_steps(group, args, device, sync_of(device)), **meta})


if __name__ == "__main__":
    main()
