"""What every bench study shares: records, scoring, matched-parameter baselines, locks, provenance, data splits
and the one significance rule. Studies run as modules from the repository root (``python -m bench.NAME``) and
import this module; tests import it too (never a study script).

The protocol a study follows through it:

- **Tuning never sees test images.** ``validation_split`` holds a fixed set of *training* images out; any
  choice (calibrate's defaults, a learning rate) is scored there. Test images are only reported.
- **One paired rule** (``paired``): where arms share seeds (images, order), A is above (below) B only when the
  95 % t interval of the paired differences lies above (below) 0; otherwise "not distinguishable at n seeds";
  under 3 pairs a difference is reported, never judged. Arms that share no seeds (the frontier's curves) fall
  back on ``compare`` (seed ranges disjoint).
- **Results from committed code only** (``run_provenance``): a tree with uncommitted changes outside the
  results is refused unless the study was started with ``--force-dirty``, and then the record says so.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

import kdna_fx
from kdna_fx.conversion import n_params, score
from kdna_fx.datamodel import find_record
from kdna_fx.errors import KDNAError
from kdna_fx.models import create_model
from kdna_fx.testing import randomize_adapters
from kdna_fx.timing import markdown_table, provenance, write_results
from kdna_fx.utils import write_json

__all__ = ["ABOVE", "BELOW", "NOT_DISTINGUISHABLE", "TIE", "DirtyTreeError", "Factorised", "compare", "factorise",
           "machine_label", "markdown_table", "matched", "n_params", "paired", "paired_cell", "prune", "ready",
           "release_lock", "report_provenance", "run_provenance", "score", "seed_range", "shared_convs",
           "take_lock", "time_call", "validation_split", "write_json", "write_results"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------------ significance

ABOVE, BELOW, TIE = "above", "below", "tie"


def seed_range(values: Sequence[float]) -> tuple[float, float]:
    """(worst, best) over the seeds."""
    if not values:
        raise ValueError("seed_range: no values (a row without finished seeds cannot be compared)")
    return min(values), max(values)


def compare(a: Sequence[float], b: Sequence[float]) -> str:
    """The rule for arms that share no seeds: ABOVE when every value of ``a`` beats every value of ``b`` (the seed ranges
    are disjoint, ``a`` on top), BELOW the reverse, TIE when the ranges touch or overlap.

    With 3 seeds a side, disjoint ranges by chance (both samples from one distribution) happen with probability
    2 / C(6, 3) = 0.1: a weak but stated test. One seed a side is a comparison of two numbers, reported as such.
    """
    lo_a, hi_a = seed_range(a)
    lo_b, hi_b = seed_range(b)
    if lo_a > hi_b:
        return ABOVE
    if hi_a < lo_b:
        return BELOW
    return TIE


NOT_DISTINGUISHABLE = "not distinguishable"


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """The paired rule, for arms that share seeds (the same images, in the same order, for the same seed):
    the differences ``a[s] - b[s]`` over the seeds both have, their mean and 95 % Student-t interval, and the
    ``outcome``: ABOVE (BELOW) when the interval lies above (below) 0, else NOT_DISTINGUISHABLE. Fewer than 3
    pairs are reported, never judged: no ``outcome`` key (and no interval under 2)."""
    from scipy.stats import t

    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "n": len(diffs), "differences": diffs,
                           "mean": statistics.mean(diffs) if diffs else None}
    if len(diffs) >= 2:
        half = float(t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / len(diffs) ** 0.5
        out["interval"] = [out["mean"] - half, out["mean"] + half]
    if len(diffs) >= 3:
        lo, hi = out["interval"]
        out["outcome"] = ABOVE if lo > 0 else BELOW if hi < 0 else NOT_DISTINGUISHABLE
    return out


def paired_cell(p: dict[str, Any] | None) -> str:
    """One paired comparison as a table cell: verdict, mean difference, 95 % interval, n."""
    if p is None or not p["n"]:
        return "-"
    if "outcome" not in p:
        spread = f" [{p['interval'][0]:+.2f}, {p['interval'][1]:+.2f}]" if "interval" in p else ""
        return f"{p['mean']:+.2f}{spread}, n={p['n']} (reported, not judged: fewer than 3 pairs)"
    word = {ABOVE: "**above**", BELOW: "**below**"}.get(p["outcome"], f"not distinguishable at {p['n']} seeds")
    return f"{word}: {p['mean']:+.2f} [{p['interval'][0]:+.2f}, {p['interval'][1]:+.2f}], n={p['n']}"


# ------------------------------------------------------------------------------------------------ timing


def time_call(fn: Callable[[], Any], *, warmup: int = 3, repeat: int = 10) -> dict[str, float]:
    """Median and spread of ``repeat`` timed calls (seconds) after ``warmup`` untimed ones."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "repeat": repeat}


# ------------------------------------------------------------------------------------------------ provenance


class DirtyTreeError(KDNAError, RuntimeError):
    """A study would record results from code that is not committed."""


def run_provenance(argv: list[str] | None = None, *, out: str | None = None, force_dirty: bool = False
                   ) -> dict[str, Any]:
    """The one provenance of every study, speed suite and profile: kdna_fx.timing.provenance (the commit read
    now, the dirty flag, machine, command), so call it when the run starts. Refuses a tree whose tracked files
    differ from the commit (bench/results aside) when the records go into bench/results (``out`` None: assume
    they do), unless ``force_dirty``; a forced record carries ``"dirty": True`` and bench.records_check lists it."""
    prov = provenance(argv)
    into_results = out is None or os.path.abspath(out).startswith(os.path.join(REPO, "bench", "results"))
    if prov["git"]["dirty"] and into_results and not force_dirty:
        raise DirtyTreeError("the working tree has uncommitted changes: results must come from committed code. "
                             "Commit first, or pass --force-dirty (the records are then marked dirty)")
    return prov


def report_provenance(stem: str, argv: list[str] | None, *, out: str, report_only: bool,
                      force_dirty: bool = False) -> dict[str, Any]:
    """The provenance a study's summary ``<stem>.json`` is written with. After a run: this run's (run_provenance:
    a dirty tree is refused unless ``force_dirty``). A report-only rewrite (``--report``) regenerates the Markdown
    and plots from the records: it keeps the provenance stored in ``<stem>.json`` (the command, machine and commit
    of the run) and adds ``report``, the rewrite's own command, date and commit (the code that wrote the tables and
    verdicts), under the same clean-tree rule; where none is stored yet it takes this command's."""
    prov = run_provenance(argv, out=out, force_dirty=force_dirty)
    if report_only and os.path.exists(f"{stem}.json"):
        with open(f"{stem}.json") as f:
            kept = json.load(f).get("provenance")
        if kept:
            return {**kept, "report": {k: prov[k] for k in ("command", "date_utc", "git")}}
    return prov


def machine_label(machine: dict[str, Any]) -> str:
    """A record's machine for a report: the CPU model and the platform's kernel build. Older records name a bare
    "AMD EPYC" for two machines, and every virtual machine here shares one host id, so the build tells them apart."""
    build = machine.get("platform", "").split("-x86_64")[0].removeprefix("Linux-")
    return f"{machine['cpu']} [{build or 'platform not recorded'}]"


# ------------------------------------------------------------------------------------------------ locks


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def take_lock(directory: str) -> bool:
    """Claim a job for this process; False when another live process holds it. A stale lock is taken over."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = int(f.read().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                return False
            os.remove(path)  # left by a process that is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release_lock(directory: str) -> None:
    try:
        os.remove(os.path.join(directory, "lock"))
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------------------------ data


def validation_split(n_train: int, n_val: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(the training indices left for a study to draw from, the held-out validation indices): a fixed seeded
    split of the ``n_train`` training images, the same for every seed of a study.

    The pool is the first ``n_train - n_val`` indices of ``randperm(n_train)`` under ``seed``: exactly the images
    ``kdna train --train-subset {n_train - n_val} --seed {seed}`` trains on (kdna_fx.data keeps that prefix), so an
    original trained that way never saw the validation images (protocol 3)."""
    if not 0 < n_val < n_train:
        raise ValueError(f"validation_split: need 0 < n_val < n_train, got {n_val} of {n_train}")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:n_train - n_val], order[n_train - n_val:]


# ------------------------------------------------------------------------------------------------ baselines


def classifier(model: nn.Module) -> nn.Module:
    """The model's last linear layer (kept whole by pruning)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def prune(model: nn.Module, ratio: float, example: Tensor) -> nn.Module:
    """Torch-Pruning (MetaPruner, L2 magnitude importance, the same ratio in every layer, the classifier
    kept) of a copy of ``model``; ``example`` is one input batch for its dependency graph."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    if ratio > 0:
        # Torch-Pruning traces its dependency graph through autograd (and asserts grad mode), so a caller's
        # torch.no_grad() must not reach it.
        with torch.enable_grad():
            pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                          pruning_ratio=ratio, ignored_layers=[classifier(model)])
            pruner.step()
    return model


class Factorised(nn.Sequential):
    """A k x k conv to ``rank`` channels, then a 1x1 conv back: the truncated SVD of one conv."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                          bias=False, padding_mode=conv.padding_mode)
        second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
        u, s, vh = torch.linalg.svd(conv.weight.detach().flatten(1).double(), full_matrices=False)
        root = s[:rank].sqrt()
        with torch.no_grad():
            first.weight.copy_((root[:, None] * vh[:rank]).reshape(first.weight.shape))
            second.weight.copy_((u[:, :rank] * root).reshape(second.weight.shape))
            if conv.bias is not None:
                second.bias.copy_(conv.bias)
        super().__init__(first, second)


def shared_convs(model: nn.Module, config: kdna_fx.KDNAConfig) -> list[str]:
    """The convs KernelDNA shares under ``config`` (every family member): what the SVD baseline factorises."""
    plan = kdna_fx.plan(model, config)
    return [name for family in plan.families for name in family.members]


def factorise(model: nn.Module, names: list[str], fraction: float) -> nn.Module:
    """A copy of ``model`` whose convs ``names`` become Factorised at ``fraction`` of their full rank (only
    where that saves parameters; grouped convs are left alone)."""
    model = copy.deepcopy(model)
    for name in names:
        conv = model.get_submodule(name)
        if conv.groups != 1:
            continue
        full = min(conv.out_channels, conv.weight[0].numel())
        rank = max(1, round(fraction * full))
        if rank * (conv.weight[0].numel() + conv.out_channels) < conv.weight.numel():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, Factorised(conv, rank))
    return model


def matched(build: Callable[[float], nn.Module], target: int, lo: float, hi: float) -> tuple[nn.Module, float]:
    """The model ``build(knob)`` with knob in [lo, hi] whose parameter count is closest to ``target``
    (bisection; the count may rise or fall with the knob), and that knob."""
    f_lo, f_hi = n_params(build(lo)), n_params(build(hi))
    increasing = f_hi > f_lo
    for _ in range(20):
        mid = (lo + hi) / 2
        above = n_params(build(mid)) > target
        if above == increasing:
            hi = mid
        else:
            lo = mid
    best = min((lo, hi), key=lambda k: abs(n_params(build(k)) - target))
    return build(best), best


# ------------------------------------------------------------------------------------------------ ready models


def ready(name: str, image_size: int, seed: int) -> nn.Module:
    """Zoo model ``name`` with random adapters and moved BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = create_model(name)
    if find_record(model) is not None:
        randomize_adapters(model)
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(8, 3, image_size, image_size))
    return model.eval()
