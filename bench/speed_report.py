"""The speed suite's report (bench/speed.py): the targets judged on its records, the per-group Markdown and the
plot, rebuilt from the JSON on disk (``--report``) without touching the records."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

from kdna_fx.timing import markdown_table


def _best_replace(timing: dict[str, Any], rows: dict[str, Any]) -> tuple[str, float]:
    cands = [(n, t["images_per_s"]) for n, t in timing.items() if rows[n]["role"] in ("replace", "folded")]
    return max(cands, key=lambda c: c[1])


BF16_INFERENCE = 0.95
"""Issue 25: in bf16, replace mode (best of unfolded and folded) at >= this share of the baseline's throughput."""
BF16_TRAIN = 0.9
"""Issue 25: a bf16-autocast training step of replace mode at >= this share of the baseline's speed."""


def bf16_target(timing: dict[str, Any], rows: dict[str, Any], mode: str, batch: Any) -> list[Any]:
    """The bf16 inference target as a [target, mode, batch, value, threshold, met] row, from one batch's bf16
    images/s per row (the suite's --variants bf16, and bench/bf16_profile.py at every batch)."""
    base = next(n for n, r in rows.items() if r["role"] == "baseline")
    best, ips = _best_replace(timing, rows)
    ratio = ips / timing[base]["images_per_s"]
    return [f"replace mode ({best}) / {base}, bf16", mode, batch, ratio, BF16_INFERENCE, ratio >= BF16_INFERENCE]


def targets(payload: dict[str, Any]) -> list[list[Any]]:
    """[target, mode, batch, value, threshold, met] rows evaluated from one group's numbers."""
    rows, out = payload["rows"], []
    base = next(n for n, r in rows.items() if r["role"] == "baseline")
    for mode, by_batch in payload["timings"].items():
        compiled = mode != "eager"
        for b, timing in by_batch.items():
            base_ips = timing[base]["images_per_s"]
            best, ips = _best_replace(timing, rows)
            if compiled:
                out.append([f"replace mode ({best}) / {base}", mode, b, ips / base_ips, 0.97, ips / base_ips >= 0.97])
            for name, r in rows.items():
                if r["role"] == "reference" and compiled:
                    bound = base_ips * rows[base]["macs"] / r["macs"]
                    ratio = timing[name]["images_per_s"] / bound
                    out.append([f"{name} / MAC bound", mode, b, ratio, 0.95, ratio >= 0.95])
                if r["role"] in ("graph", "graph folded") and compiled:
                    model = next(n for n, g in rows.items() if g["role"] == {"graph": "replace",
                                                                              "graph folded": "folded"}[r["role"]])
                    ratio = timing[model]["images_per_s"] / timing[name]["images_per_s"]
                    out.append([f"{model} / {name}", mode, b, ratio, 0.97, ratio >= 0.97])
                if name == "ODConv 1x":
                    need = 3.0 if int(b) >= 32 else 1.5
                    ratio = ips / timing[name]["images_per_s"]
                    out.append([f"KernelDNA ({best}) / ODConv 1x", mode, b, ratio, need, ratio >= need])
    batches = "/".join(sorted(next(iter(payload["timings"].values())), key=int))
    for name, r in rows.items():
        if "graphs_dynamic" in r and name != base:
            extra = r["graphs_dynamic"] - rows[base]["graphs_dynamic"]
            out.append([f"{name}: graphs beyond {base}'s {rows[base]['graphs_dynamic']} (dynamic=True)", "inductor",
                        batches, extra, 0, extra <= 0])
    variants = payload.get("variants", {}).get("variants", {})
    bf16 = {n: v["bf16"] for n, v in variants.items() if "bf16" in v}
    if base in bf16 and any(rows[n]["role"] in ("replace", "folded") for n in bf16):
        out.append(bf16_target(bf16, rows, "freezing, bf16 autocast", payload["variants"]["batch"]))
    train = payload.get("train", {"train": {}})
    for name, t in train["train"].items():
        ratio = t["eager"]["median_s"] / t["inductor"]["median_s"]
        out.append([f"{name} train step: eager / compiled time", "inductor", train["batch"], ratio, 1.0, ratio > 1.0])
    replace = next((n for n in train["train"] if rows[n]["role"] == "replace"), None)
    if train.get("amp") == "bf16" and base in train["train"] and replace:
        ratio = train["train"][base]["inductor"]["median_s"] / train["train"][replace]["inductor"]["median_s"]
        out.append([f"{replace} / {base} bf16 train step speed", "inductor, bf16 autocast", train["batch"], ratio,
                    BF16_TRAIN, ratio >= BF16_TRAIN])
    return out


def report(out_dir: str, device: str, groups: Iterable[str]) -> str:
    """speed_<device>.md and .png from the JSON on disk of every group in ``groups``; returns the Markdown."""
    payloads = []
    for group in groups:
        stem = os.path.join(out_dir, f"{group}_{device}")
        if not os.path.exists(f"{stem}.json"):
            continue
        with open(f"{stem}.json") as f:
            payload = json.load(f)
        for part in ("variants", "train"):  # written by their own runs, with their own command
            if os.path.exists(f"{stem}_{part}.json"):
                with open(f"{stem}_{part}.json") as f:
                    payload[part] = json.load(f)
        payloads.append(payload)
    if not payloads:
        raise SystemExit(f"no results in {out_dir} for device {device!r}: run bench/speed.py first")
    md = [f"# Speed suite ({device})", ""]
    for p in payloads:
        md += _group_markdown(p)
    with open(os.path.join(out_dir, f"speed_{device}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    _plot(payloads, os.path.join(out_dir, f"speed_{device}.png"))
    return "\n".join(md)


def _group_markdown(p: dict[str, Any]) -> list[str]:
    rows, timings = p["rows"], p["timings"]
    base = next(n for n, r in rows.items() if r["role"] == "baseline")
    batches = sorted(next(iter(timings.values())), key=int)
    shape = "x".join(map(str, p.get("input", (3, p["image_size"], p["image_size"]))))
    md = [f"## {p['group']}: {shape}, {p['device']}, eval", "",
          "Images/s (median; relative spread in brackets) and the ratio to the baseline in the same mode.", ""]
    headers = ["row", "params", "GMACs", *[f"{m} b{b}" for m in timings for b in batches]]
    table = []
    for name, r in rows.items():
        cells = [name, f"{r['params']:,}", f"{r['macs'] / 1e9:.2f}"]
        for mode in timings:
            for b in batches:
                t = timings[mode][b][name]
                ratio = t["images_per_s"] / timings[mode][b][base]["images_per_s"]
                cells.append(f"{t['images_per_s']:.1f} ({t['iqr_rel']:.0%}) x{ratio:.2f}")
        table.append(cells)
    md += [markdown_table(headers, table), ""]
    compiled = [m for m in timings if m != "eager"]
    measured = [m for m in timings if m in next(iter(rows.values())).get("peak_bytes", {})]
    extra = [[n, *["/".join(f"{r['compile_s'][m][b]:.0f}" for b in batches) for m in compiled],
              *[f"{r['peak_bytes'][m] / 2**20:.1f}" for m in measured], r.get("graphs_dynamic", "")]
             for n, r in rows.items()]
    md += ["Compile time per batch size (static shapes), peak memory of one forward above what was live, and the "
           "graphs one `torch.compile(dynamic=True)` needed across all batch sizes:", ""]
    md += [markdown_table(["row", *[f"compile s ({m}, b{'/'.join(batches)})" for m in compiled],
                           *[f"peak MiB b{batches[0]} ({m})" for m in measured], "graphs (dynamic)"], extra), ""]
    if "train" in p:
        t = p["train"]
        md += [f"Training step (SGD, forward + backward + step), batch {t['batch']}; a reference topology trains "
               "in its unfolded form:", ""]
        md += [markdown_table(["row", "eager ms", "compiled ms", "compiled first call s"],
                              [[n, f"{r['eager']['median_s'] * 1e3:.0f}", f"{r['inductor']['median_s'] * 1e3:.0f}",
                                f"{r['inductor']['first_call_s']:.0f}"] for n, r in t["train"].items()]),
               "", f"Command: `{t['provenance']['command']}`", ""]
    if "variants" in p:
        v = p["variants"]
        names = list(next(iter(v["variants"].values())))
        md += [f"Inference variants (Inductor with freezing, batch {v['batch']}), images/s:", ""]
        md += [markdown_table(["row", *names], [[n, *[f"{r[k]['images_per_s']:.1f}" for k in names]]
                                                for n, r in v["variants"].items()]),
               "", f"Command: `{v['provenance']['command']}`", ""]
    md += ["Targets:", "", markdown_table(["target", "mode", "batch", "value", "needs", "met"],
                                          [[t[0], t[1], t[2], f"{t[3]:.3g}", f">= {t[4]}" if t[4] else "0",
                                            "yes" if t[5] else "**no**"] for t in targets(p)]), ""]
    prov = p["provenance"]
    md += [f"Command: `{prov['command']}`  ", f"Machine: {prov['machine']['cpu']}, {prov['machine']['cores']} cores, "
           f"torch threads {prov['machine']['torch_threads']}, GPU: {prov['machine']['gpu']}; load average during "
           f"the run {p['load_average']}  ", "Versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
           + f"  ", f"Date (UTC): {prov['date_utc']}, commit {commit_of(p)}", ""]
    return md


def _plot(payloads: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(payloads), figsize=(6 * len(payloads), 4.5), squeeze=False)
    for ax, p in zip(axes[0], payloads):
        mode = "freezing" if "freezing" in p["timings"] else list(p["timings"])[-1]
        timing = p["timings"][mode]
        batches = sorted(timing, key=int)
        base = next(n for n, r in p["rows"].items() if r["role"] == "baseline")
        names = [n for n in p["rows"] if n != base]
        width = 0.8 / len(batches)
        for i, b in enumerate(batches):
            ratios = [timing[b][n]["images_per_s"] / timing[b][base]["images_per_s"] for n in names]
            ax.bar([j + i * width for j in range(len(names))], ratios, width, label=f"batch {b}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.97, color="r", lw=0.8, ls="--", label="0.97 target")
        ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylabel(f"throughput / {base} ({mode})")
        ax.set_title(f"{p['group']}, {p['image_size']} px, {p['device']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def commit_of(record: dict[str, Any]) -> str:
    """A record's commit, marked when its tree was dirty (older records kept a bare commit beside the provenance,
    with no dirty flag)."""
    git = record["provenance"].get("git") or {"commit": record.get("commit", "?"), "dirty": "unknown"}
    return f"{git['commit']}" + {True: " (dirty tree)", "unknown": " (dirty flag not recorded)"}.get(git["dirty"], "")
