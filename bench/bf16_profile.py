"""bf16 inference of replace mode against its baseline (issue 25 item 4): timings and, optionally, a profile.

    .venv/bin/python -m bench.bf16_profile                                   # ResNet-18 and -50, batches 1 8 32
    .venv/bin/python -m bench.bf16_profile --models resnet18 --batches 32 --profile
    .venv/bin/python -m bench.bf16_profile --report                          # Markdown from the JSON on disk

Rows per network: the torchvision baseline, ``kdna_fx.transform`` of it (replace mode) and its folded form
(``kdna_fx.fold``, the deploy form). Every row is compiled with Inductor and ``freezing=True`` (static shapes,
one graph per batch), and run in bf16 in one of two ways (``--cast``):

- ``autocast`` (default, as the speed suite's ``--variants bf16``): fp32 model and input under
  ``torch.autocast("cpu", dtype=torch.bfloat16)``;
- ``model``: the model and the input cast to bf16 (``model.to(torch.bfloat16)``).

``--dtypes fp32 bf16`` times the fp32 rows in the same interleaved run, to check that a change for bf16 costs
nothing in fp32. Rows are timed interleaved (kdna_fx.timing.time_interleaved). ``--profile`` adds, per network
at the largest batch, torch.profiler's top CPU ops of the bf16 replace-mode rows (Inductor's kernel profiling is
then on for every row, so Inductor's own kernels are named in the profile).

Writes bench/results/speed/bf16_<cast>_cpu[_<tag>].{json,md} with the command, machine, versions and load average.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Any, Callable

import torch
from torch import nn

from kdna_fx.timing import markdown_table, time_interleaved

from bench.common import run_provenance
from bench.speed import GROUPS, OUT, inductor_freezing, save_and_say  # the suite's rows
from bench.speed_report import bf16_target, commit_of  # and its bf16 rule

ROLES = ("baseline", "replace", "folded")


def rows(model: str) -> dict[str, tuple[Callable[[], nn.Module], str]]:
    """The speed suite's baseline, replace-mode and folded rows of ``model``: name -> (builder, role)."""
    return {name: (build, role) for name, build, role in GROUPS[model] if role in ROLES}


def _bf16_call(compiled: Callable[[torch.Tensor], Any], x: torch.Tensor, dtype: str,
               cast: str) -> Callable[[], Any]:
    if dtype == "fp32" or cast == "model":
        return lambda: compiled(x)

    def call() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compiled(x)
    return call


def measure(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of every (row, dtype) at every batch, interleaved per batch."""
    torch.manual_seed(0)
    built = {name: build().eval() for name, (build, _) in rows(model_name).items()}
    models: dict[tuple[str, str], nn.Module] = {}
    for name, m in built.items():
        for dtype in args.dtypes:
            cast_model = dtype == "bf16" and args.cast == "model"
            models[(name, dtype)] = copy.deepcopy(m).to(torch.bfloat16) if cast_model else m
    out: dict[str, Any] = {}
    for b in args.batches:
        torch._dynamo.reset()
        x32 = torch.randn(b, 3, args.image_size, args.image_size)
        calls = {}
        with inductor_freezing(True), torch.inference_mode():
            for (name, dtype), m in models.items():
                x = x32.to(torch.bfloat16) if dtype == "bf16" and args.cast == "model" else x32
                call = _bf16_call(torch.compile(m), x, dtype, args.cast)
                call()
                calls[f"{name} | {dtype}"] = call
            repeat = max(1, args.repeat // b) if b > 1 else args.repeat
            timed = time_interleaved(calls, warmup=1, repeat=repeat, rounds=args.rounds)
            if args.profile:
                out.setdefault("profile", {})[str(b)] = {k: _profile(calls[k]) for k in calls if k.endswith(" | bf16")}
        for key, t in timed.items():
            out.setdefault("timings", {}).setdefault(str(b), {})[key] = dict(t, images_per_s=b / t["median_s"])
    return out


def is_gate_kernel(name: str) -> bool:
    """Whether a profiled op is what a gate runs once compiled with freezing: a generated kernel with its mean, its
    scaling, its sigmoid or (unfolded) its BatchNorm in the name, or a linear layer (oneDNN's bf16 one, MKL's fp32
    one). The baseline runs some of these too (its global pooling and classifier): gate_share subtracts them."""
    if "cpp_fused" in name:
        return any(part in name for part in ("mean", "mul", "sigmoid", "batch_norm"))
    return any(op in name for op in ("_linear_pointwise", "_mkl_linear", "aten::addmm", "aten::linear"))


def _profile(call: Callable[[], Any], calls: int = 3, top: int = 25) -> dict[str, Any]:
    """torch.profiler over ``calls`` calls: the top ops by self CPU time, the total and the gate-like kernels' time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    events = prof.key_averages()
    ops = [e for e in events if "Compiled" not in e.key and "CompiledFxGraph" not in e.key]
    total = sum(e.self_cpu_time_total for e in ops) / 1e6 / calls
    gate = sum(e.self_cpu_time_total for e in ops if is_gate_kernel(e.key)) / 1e6 / calls
    return {"table": events.table(sort_by="self_cpu_time_total", row_limit=top), "total_s": total, "gate_like_s": gate}


def gate_share(model_name: str, profiles: dict[str, Any]) -> dict[str, float]:
    """Per KernelDNA row: (its gate-like kernels' time - the baseline's) / its total op time, from one batch's profiles."""
    base = profiles[f"{model_name} | bf16"]
    return {k.split(" | ")[0]: (p["gate_like_s"] - base["gate_like_s"]) / p["total_s"]
            for k, p in profiles.items() if k != f"{model_name} | bf16"}


def targets(model_name: str, result: dict[str, Any]) -> list[list[Any]]:
    """The speed suite's bf16 rule (speed.bf16_target) at every batch."""
    roles = {name: {"role": role} for name, (_, role) in rows(model_name).items()}
    out = []
    for b, timing in result["timings"].items():
        bf16 = {k.split(" | ")[0]: t for k, t in timing.items() if k.endswith(" | bf16")}
        if bf16:
            out.append(bf16_target(bf16, roles, "freezing", b))
    return out


def _ratio(timing: dict[str, Any], key: str, model_name: str) -> float:
    return timing[key]["images_per_s"] / timing[f"{model_name} | {key.split(' | ')[1]}"]["images_per_s"]


def markdown(payload: dict[str, Any]) -> str:
    md = [f"# bf16 inference ({payload['cast']}), Inductor with freezing, CPU", ""]
    for model_name, result in payload["models"].items():
        batches = list(result["timings"])
        keys = list(result["timings"][batches[0]])
        table = [[*k.split(" | "), *[f"{result['timings'][b][k]['images_per_s']:.1f} ({result['timings'][b][k]['iqr_rel']:.0%})"
                                     f" x{_ratio(result['timings'][b], k, model_name):.3f}" for b in batches]]
                 for k in keys]
        md += [f"## {model_name}", "", "Images/s (median; relative spread in brackets) and the ratio to the baseline "
               "in the same dtype:", "",
               markdown_table(["row", "dtype", *[f"b{b}" for b in batches]], table), "",
               markdown_table(["target", "dtype", "batch", "value", "needs", "met"],
                              [[t[0], "bf16", t[2], f"{t[3]:.3f}", f">= {t[4]}", "yes" if t[5] else "**no**"]
                               for t in targets(model_name, result)]), ""]
        profiles = result.get("profile", {})
        if profiles:
            share = {b: gate_share(model_name, profiles[b]) for b in profiles}
            rows_ = list(next(iter(share.values())))
            md += ["Share of each KernelDNA row's op time spent in its gates (torch.profiler, Inductor kernel profiling; "
                   "gate-like kernels minus the baseline's own pooling and classifier):", "",
                   markdown_table(["row", *[f"b{b}" for b in share]], [[r, *[f"{share[b][r]:.1%}" for b in share]]
                                                                     for r in rows_]), ""]
            b = max(profiles, key=int)
            for key, prof in profiles[b].items():
                md += [f"Profile of `{key}` (3 calls, batch {b}):", "", "```", prof["table"], "```", ""]
    prov = payload["provenance"]
    md += [f"Command: `{prov['command']}`  ", f"Machine: {prov['machine']['cpu']}, {prov['machine']['cores']} cores, "
           f"torch threads {prov['machine']['torch_threads']}; load average before / after "
           f"{payload['load_before']} / {payload['load_after']}  ",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()) + "  ",
           f"Date (UTC): {prov['date_utc']}, commit {commit_of(payload)}", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"], choices=["resnet18", "resnet50"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["fp32", "bf16"])
    p.add_argument("--cast", choices=("autocast", "model"), default="autocast")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeat", type=int, default=8, help="calls per round at batch 1 (fewer at larger batches)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=OUT)
    p.add_argument("--tag", default="", help="suffix of the file names, to keep a repeated or narrower run apart")
    p.add_argument("--report", action="store_true", help="only rebuild the Markdown from the JSON on disk")
    args = p.parse_args(argv)
    stem = os.path.join(args.out, f"bf16_{args.cast}_cpu" + (f"_{args.tag}" if args.tag else ""))
    if args.report:
        with open(f"{stem}.json") as f:
            payload = json.load(f)
    else:
        payload = run(args, ["bench/bf16_profile.py", *argv] if argv is not None else None)
        save_and_say(f"{stem}.json", payload)
    md = markdown(payload)
    with open(f"{stem}.md", "w") as f:
        f.write(md)
    print(md)


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    import torch._inductor.config as inductor_config

    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {"provenance": run_provenance(argv, out=args.out), "cast": args.cast,
                               "load_before": os.getloadavg()}
    # Kernel profiling is read when the code is generated: on for every row alike, so the timings stay comparable.
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096,
                                    fail_on_recompile_limit_hit=True), \
            inductor_config.patch({"cpp.enable_kernel_profile": args.profile}):
        payload["models"] = {m: measure(m, args) for m in args.models}
    payload["load_after"] = os.getloadavg()
    return payload


if __name__ == "__main__":
    main()
