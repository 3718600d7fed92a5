"""LayerSimilarity: the CKA matrix of one model's conv outputs, its most similar pairs, and its heat map."""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from kdna_fx.errors import CKAError, KDNAError
from kdna_fx.tables import format_table


def stages(names: Sequence[str]) -> list[str]:
    """The stage of each layer: the shortest leading part of its dotted name that tells stages apart.

    ``layer1.0.conv1`` -> ``layer1`` for a ResNet; when all names share their first component (``features.3...``)
    the next one is used too.
    """
    parts = [n.split(".") for n in names]
    deepest = max((len(p) for p in parts), default=1)
    for depth in range(1, deepest):
        keys = [".".join(p[:depth]) for p in parts]
        if len(set(keys)) > 1:
            return keys
    return [p[0] for p in parts]


@dataclass
class LayerSimilarity:
    """Linear CKA between the conv outputs of one model: ``matrix[i, j]`` compares ``names[i]`` and ``names[j]``."""

    names: list[str]
    matrix: Tensor
    pool: str
    images: int
    label: str = ""

    def __post_init__(self) -> None:
        if tuple(self.matrix.shape) != (len(self.names), len(self.names)):
            raise CKAError(f"LayerSimilarity: a matrix of shape {tuple(self.matrix.shape)} does not fit "
                           f"{len(self.names)} names")

    def __getitem__(self, pair: tuple[str, str]) -> float:
        """``sim["layer1.0.conv1", "layer1.1.conv2"]``: the CKA of two layers."""
        i, j = (self._index(n) for n in pair)
        return float(self.matrix[i, j])

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise CKAError(f"no layer {name!r} here{did_you_mean(name, self.names)}") from None

    def top_pairs(self, k: int = 10) -> list[tuple[str, str, float]]:
        """The ``k`` most similar pairs of distinct layers, most similar first (ties: layer order)."""
        i, j = torch.triu_indices(len(self.names), len(self.names), offset=1)
        values = self.matrix[i, j]
        keep = ~values.isnan()
        order = sorted(zip((-values[keep]).tolist(), i[keep].tolist(), j[keep].tolist()))[:k]
        return [(self.names[a], self.names[b], -v) for v, a, b in order]

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready form (NaN -> None)."""
        rows = [[None if math.isnan(v) else v for v in row] for row in self.matrix.tolist()]
        return {"names": list(self.names), "matrix": rows, "pool": self.pool, "images": self.images,
                "label": self.label}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSimilarity:
        """Inverse of ``to_dict`` (for example to redraw a saved cka.json)."""
        matrix = torch.tensor([[math.nan if v is None else v for v in row] for row in d["matrix"]],
                              dtype=torch.float64).reshape(len(d["names"]), len(d["names"]))
        return cls(list(d["names"]), matrix, d["pool"], int(d["images"]), d.get("label", ""))

    def __str__(self) -> str:
        title = (f"{self.label + ': ' if self.label else ''}most similar conv pairs, linear CKA "
                 f"({len(self.names)} layers, {self.images} images, {self.pool} pooling)")
        return format_table(["layer", "layer", "CKA"], [[a, b, f"{v:.3f}"] for a, b, v in self.top_pairs()],
                            title=title)

    def plot(self, path: str | os.PathLike[str], title: str | None = None,
             compare: LayerSimilarity | None = None) -> None:
        """Write the heat map as a PNG; with ``compare``, the two maps side by side (original vs transformed)."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise KDNAError("LayerSimilarity.plot needs matplotlib: pip install matplotlib (or the plot extra: pip install kdna_fx[plot])") from None
        panels = [self] if compare is None else [self, compare]
        size = max(4.0, 0.22 * max(len(p.names) for p in panels) + 2.5)
        # Figure, not pyplot: no global backend or state is touched, and it renders with Agg.
        fig = Figure(figsize=(size * len(panels) + 1.2, size), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        default = ("original", "transformed")
        for k, (ax, sim) in enumerate(zip(axes, panels)):
            image = sim._draw(ax, sim.label or (default[k] if compare is not None else ""))
        fig.colorbar(image, ax=list(axes), label="linear CKA", shrink=0.8)
        pools = " vs ".join(dict.fromkeys(p.pool for p in panels))
        counts = " / ".join(dict.fromkeys(str(p.images) for p in panels))
        fig.suptitle(title or f"Linear CKA between conv outputs ({pools} pooling, {counts} images)")
        fig.savefig(os.fspath(path), dpi=150)

    def _draw(self, ax: Any, label: str) -> Any:
        n = len(self.names)
        image = ax.imshow(self.matrix.numpy(), vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest")
        font = max(3.0, min(8.0, 400.0 / max(n, 1)))
        ax.set_xticks(range(n), self.names, rotation=90, fontsize=font)
        ax.set_yticks(range(n), self.names, fontsize=font)
        keys = stages(self.names)
        for i in range(1, n):
            if keys[i] != keys[i - 1]:  # a stage boundary: a line between the two layers
                ax.axhline(i - 0.5, color="cyan", linewidth=0.8)
                ax.axvline(i - 0.5, color="cyan", linewidth=0.8)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_title(f"{label + ' - ' if label else ''}{self.pool} pooling", fontsize=10)
        return image


def did_you_mean(name: str, names: Sequence[str]) -> str:
    """'; did you mean ...?' naming the closest of ``names``, or ''."""
    close = difflib.get_close_matches(name, list(names), n=3)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""
