"""Linear CKA between the outputs of a CNN's convolutions: how alike its layers are (issue 9).

    sim = kdna_fx.cka.layer_similarity(model, images)      # every conv, transformed models included
    print(sim)                                              # the most similar pairs
    sim.plot("cka.png", compare=kdna_fx.cka.layer_similarity(kmodel, images))

Linear CKA (Kornblith et al. 2019) compares two representations of the same n examples, X [n, d_x] and
Y [n, d_y]: 1 when one is an orthogonal transform of the other up to scale, near 0 when unrelated. Across a
whole network the features do not fit in memory, so ``layer_similarity`` uses the minibatch CKA of Nguyen,
Raghu & Kornblith (2021): per batch, the unbiased HSIC estimator (Song et al. 2012) of every pair of layers
from their n x n Gram matrices, averaged over batches, then CKA = HSIC_xy / sqrt(HSIC_xx HSIC_yy).
Everything is computed in float64. See docs/cka.md.
"""
from __future__ import annotations

import contextlib
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor, fx, nn

from .adapters import ChildAdapter
from .errors import KDNAError
from .utils import KeptModes, device_dtype
from .datamodel import child_nodes, graph_of, interpreted, tag_of
from .tables import format_table

Pool = Literal["flatten", "mean"]
POOLS = ("flatten", "mean")
# Columns of features turned into a Gram matrix at once: bounds the float64 copy of a large feature map.
_GRAM_CHUNK = 1 << 16


class CKAError(KDNAError, ValueError):
    """Inputs CKA cannot be computed on (shapes, too few examples, constant features); the message says why."""


# ---- CKA of two feature matrices ----------------------------------------------------------------------------
def _matrix(x: Any, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise CKAError(f"{name} must be a feature matrix [n, d] (one row per example), got shape {tuple(x.shape)}; "
                       f"flatten each example first: {name}.reshape(len({name}), -1)")
    if x.dtype.is_complex:
        raise CKAError(f"{name} must hold real numbers, got {x.dtype}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise CKAError(f"{name} holds NaN or infinite values; CKA needs finite features")
    return x


def _pair(x: Any, y: Any, min_n: int, why: str) -> tuple[Tensor, Tensor]:
    x, y = _matrix(x, "X"), _matrix(y, "Y")
    if len(x) != len(y):
        raise CKAError(f"X has {len(x)} rows but Y has {len(y)}: both need one row per example, for the same "
                       f"examples in the same order")
    if len(x) < min_n:
        raise CKAError(f"{len(x)} examples are too few: {why}; give at least {min_n}")
    return x, y


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of feature matrices ``x`` [n, d_x] and ``y`` [n, d_y] (same n examples, same order).

    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features, or the same quantity from the n x n Gram
    matrices when that is cheaper (wide features, few examples). Float64 inside; result in [0, 1].
    """
    x, y = _pair(x, y, 2, "centring leaves nothing of a single example")
    x, y = x - x.mean(0), y - y.mean(0)
    n, dx, dy = len(x), x.shape[1], y.shape[1]
    if n * n * (dx + dy) < n * (dx * dy + dx * dx + dy * dy):  # the Gram form multiplies fewer numbers
        k, lg = x @ x.T, y @ y.T
        num, nx, ny = (k * lg).sum(), torch.linalg.norm(k), torch.linalg.norm(lg)
    else:
        num = torch.linalg.norm(y.T @ x) ** 2
        nx, ny = torch.linalg.norm(x.T @ x), torch.linalg.norm(y.T @ y)
    for norm, name in ((nx, "X"), (ny, "Y")):
        if norm == 0:
            raise CKAError(f"{name} is the same for every example (zero variance): CKA is undefined")
    return float(num / (nx * ny))


def gram(features: Tensor) -> Tensor:
    """The float64 linear-kernel Gram matrix X X^T [n, n] of ``features`` [n, ...], flattened and centred.

    Centring does not change the unbiased HSIC (it ignores a shift of the features) but spares it a
    cancellation: uncentred Grams of features with a large mean lose digits in its sums.
    """
    x = features.detach().reshape(len(features), -1)
    out = torch.zeros(len(x), len(x), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], _GRAM_CHUNK):
        part = x[:, start:start + _GRAM_CHUNK].to(torch.float64)
        part = part - part.mean(0)
        out += part @ part.T
    return out


def unbiased_hsic(k: Tensor, l: Tensor) -> float:  # noqa: E741 - the paper's name
    """The unbiased HSIC estimator of Song et al. (2012) from two Gram matrices [n, n], n >= 4.

    With K~, L~ the Grams with zeroed diagonals: [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1]
    / (n(n-3)). Its mean over mini-batches estimates the data's HSIC whatever the batch size, which the
    centred (biased) estimate's does not.
    """
    n = len(k)
    if n < 4:
        raise CKAError(f"{n} examples are too few for the unbiased HSIC (it divides by n - 3); give at least 4")
    kt, lt = k.to(torch.float64).clone(), l.to(torch.float64).clone()
    kt.fill_diagonal_(0)
    lt.fill_diagonal_(0)
    # tr(K~L~) and 1'K~L~1 without an n x n x n product
    value = ((kt * lt.T).sum() + kt.sum() * lt.sum() / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * (kt.sum(0) @ lt.sum(1)))
    return float(value / (n * (n - 3)))


def unbiased_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of ``x`` [n, d_x] and ``y`` [n, d_y] from unbiased HSIC estimates over all n examples (n >= 4)."""
    x, y = _pair(x, y, 4, "the unbiased HSIC divides by n - 3")
    k, lg = gram(x), gram(y)
    hxy, hxx, hyy = unbiased_hsic(k, lg), unbiased_hsic(k, k), unbiased_hsic(lg, lg)
    for value, name in ((hxx, "X"), (hyy, "Y")):
        if value <= 0:
            raise CKAError(f"the unbiased self-similarity (HSIC) of {name} is {value:.3g} <= 0: {name} is (nearly) "
                           f"constant over these examples, or there are too few of them; give more examples")
    return hxy / math.sqrt(hxx * hyy)


class MinibatchCKA:
    """Streaming linear CKA of many layers: unbiased HSIC per mini-batch, averaged (Nguyen et al. 2021).

    ``update`` takes each batch's features of every layer (the same layers, in the same order, every time);
    ``matrix`` returns the [L, L] CKA of the batches seen so far. Memory: L Gram matrices of one batch.
    """

    def __init__(self) -> None:
        self.hsic: Tensor | None = None  # [L, L] sum over batches of the unbiased HSIC of each pair
        self.batches = 0

    def update(self, features: Sequence[Tensor]) -> None:
        """Add one batch: ``features[i]`` is layer i's output [b, ...] for the same b examples."""
        self.update_grams([gram(f) for f in features])

    def update_grams(self, grams: Sequence[Tensor]) -> None:
        """Add one batch given each layer's Gram matrix [b, b] (see ``gram``)."""
        if not grams:
            raise CKAError("MinibatchCKA.update got no layers; pass one feature tensor per layer")
        sizes = {tuple(g.shape) for g in grams}
        if len(sizes) != 1 or len(next(iter(sizes))) != 2 or len(set(next(iter(sizes)))) != 1:
            raise CKAError(f"every layer's Gram matrix must be [b, b] for the same b examples, got {sorted(sizes)}")
        n = len(grams[0])
        if n < 4:
            raise CKAError(f"a batch of {n} examples is too small for the unbiased HSIC (it divides by n - 3); "
                           f"use batches of at least 4")
        if self.hsic is not None and len(grams) != len(self.hsic):
            raise CKAError(f"this batch has {len(grams)} layers, the earlier ones had {len(self.hsic)}")
        g = torch.stack([k.to(torch.float64) for k in grams])
        g.diagonal(dim1=1, dim2=2).zero_()
        flat, rows, totals = g.reshape(len(g), -1), g.sum(2), g.sum((1, 2))
        # The estimator is bilinear in (K~, L~): every pair at once from three inner-product matrices.
        hsic = (flat @ flat.T + torch.outer(totals, totals) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (rows @ rows.T)) / (n * (n - 3))
        hsic = (hsic + hsic.T) / 2  # exactly symmetric, whatever order the matmul summed in
        self.hsic = hsic.cpu() if self.hsic is None else self.hsic + hsic.cpu()
        self.batches += 1

    def matrix(self) -> Tensor:
        """[L, L] float64 CKA; NaN for a layer whose mean self-HSIC is not positive (constant output)."""
        if self.hsic is None:
            raise CKAError("MinibatchCKA.matrix: no batch was added yet; call update first")
        mean = self.hsic / self.batches
        diag = mean.diagonal()
        defined = diag > 0
        both = defined[:, None] & defined[None, :]
        scale = torch.outer(diag, diag).clamp_min(1e-300).sqrt()
        cka = torch.where(both, mean / scale, torch.full_like(mean, math.nan))
        cka.diagonal()[defined] = 1.0  # m / sqrt(m m) is 1; spare the rounding
        return cka


# ---- the result -----------------------------------------------------------------------------------------------
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
            raise CKAError(f"no layer {name!r} here{_close(name, self.names)}") from None

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


# ---- measuring a model -------------------------------------------------------------------------------------------
def _close(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def _graph(model: nn.Module) -> fx.GraphModule | None:
    """The rewritten graph of ``model`` when it holds child convs (their calls are graph nodes, not modules)."""
    gm = graph_of(model)
    return gm if gm is not None and child_nodes(gm) else None


def _conv_modules(model: nn.Module, gm: fx.GraphModule | None) -> list[tuple[str, nn.Module]]:
    """The convs that run as modules: nn.Conv2d, and swapped children (in a rewritten graph ``gm`` a child is a
    node, its ChildAdapter never called)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) or (gm is None and isinstance(m, ChildAdapter))]


def _conv_names(model: nn.Module) -> list[str]:
    """Every conv the model runs: conv modules (swapped children included), and in a rewritten graph its child
    convs, named from the model's root."""
    gm = _graph(model)
    names = [n for n, _ in _conv_modules(model, gm)]
    names += [tag_of(n).child for n in child_nodes(gm)] if gm is not None else []
    return names


class _ConvInterpreter(fx.Interpreter):
    """Runs a transformed GraphModule node by node and hands each child conv's output to ``record``.

    A child conv is a call to kdna_fx.functional.child_conv2d, not a module, so a hook cannot see it.
    """

    def __init__(self, gm: fx.GraphModule, record: Callable[[str, Tensor], None]):
        super().__init__(gm)
        self.record = record

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        tag = tag_of(n)
        if tag is not None and tag.role == "child_conv":
            self.record(tag.child, out)
        return out


def _image(x: Any) -> Tensor:
    if isinstance(x, (tuple, list)) and x:
        x = x[0]  # (images, labels)
    if not isinstance(x, Tensor) or x.ndim not in (3, 4):
        what = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise CKAError(f"data must give images [B, C, H, W] (or [C, H, W]), or (images, labels) pairs; got {what}")
    return x if x.ndim == 4 else x[None]


def _stream(data: Any, images: int, batch_size: int, generator: torch.Generator) -> tuple[Iterator[Tensor], int]:
    """Image batches of ``data`` (as given, to be re-cut) and how many images to expect (an upper bound)."""
    if isinstance(data, Tensor):
        if data.ndim != 4:
            raise CKAError(f"a tensor of images must be [N, C, H, W], got shape {tuple(data.shape)}")
        order = torch.randperm(len(data), generator=generator)[:images]
        return (data[order[i:i + batch_size]] for i in range(0, len(order), batch_size)), len(order)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, torch.utils.data.DataLoader):
        order = torch.randperm(len(data), generator=generator)[:images].tolist()  # a map-style data set
        return (_image(data[i]) for i in order), len(order)
    return (_image(x) for x in data), images


def _batches(stream: Iterable[Tensor], images: int, batch_size: int) -> Iterator[Tensor]:
    """Re-cut ``stream`` into batches of ``batch_size`` up to ``images`` images in all.

    The unbiased HSIC needs 4 examples per batch, so a remainder of fewer joins the batch before it.
    """
    held: Tensor | None = None
    buffer: list[Tensor] = []
    taken = 0
    for x in stream:
        x = x[: images - taken]
        buffer.append(x)
        taken += len(x)
        while sum(len(b) for b in buffer) >= batch_size:
            whole = torch.cat(buffer)
            buffer = [whole[batch_size:]]
            if held is not None:
                yield held
            held = whole[:batch_size]
        if taken >= images:
            break
    rest = torch.cat(buffer) if buffer else None
    if rest is not None and len(rest):
        if held is not None and len(rest) < 4:
            held = torch.cat([held, rest])
        else:
            if held is not None:
                yield held
            held = rest
    if held is not None:
        yield held


def layer_similarity(model: nn.Module, data: Any, layers: Sequence[str] | None = None, *, images: int = 512,
                     pool: Pool = "flatten", batch_size: int = 64, seed: int = 0,
                     progress: bool = True) -> LayerSimilarity:
    """Linear CKA (minibatch, unbiased HSIC) between the outputs of the model's convs on ``data``.

    ``data``: images [N, C, H, W] (``images`` of them drawn with ``seed``), a map-style data set of images or
    (image, label) pairs (likewise), or any iterable such as a DataLoader of image batches or (images, labels)
    (the first ``images``). ``layers``: conv names to keep (default: every nn.Conv2d, and every child conv of a
    model transformed by kdna_fx, under its original name). Layers come in the order they run. ``pool``:
    "flatten" compares whole feature maps, "mean" their spatial means [n, C]. The model runs in eval mode
    without gradients; its training flags are restored afterwards.
    """
    if pool not in POOLS:
        raise CKAError(f"pool must be 'flatten' (whole feature maps) or 'mean' (spatial means), got {pool!r}")
    if images < 4 or batch_size < 4:
        raise CKAError(f"images ({images}) and batch_size ({batch_size}) must both be >= 4: the unbiased HSIC "
                       f"estimator divides by n - 3")
    available = _conv_names(model)
    if not available:
        raise CKAError(f"{type(model).__name__} has no nn.Conv2d (nor kdna_fx child conv) to compare")
    wanted = None if layers is None else list(layers)
    if wanted is not None and not wanted:
        raise CKAError("layers is empty; pass conv names to compare, or None for every conv")
    for name in wanted or ():
        if name not in available:
            raise CKAError(f"no conv named {name!r} in the model{_close(name, available)} "
                           f"(convs are named by module path, e.g. {available[0]!r})")

    grams: dict[str, Tensor] = {}

    def record(name: str, output: Tensor) -> None:
        if wanted is not None and name not in wanted:
            return
        key, k = name, 2
        while key in grams:  # a conv module run twice in one forward: one layer per call
            key, k = f"{name}#{k}", k + 1
        features = output.mean((2, 3)) if pool == "mean" else output
        grams[key] = gram(features)

    device, dtype = device_dtype(model)
    watched = contextlib.ExitStack()
    gm = _graph(model)
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: record(name, o))
             for name, m in _conv_modules(model, gm)]
    watched.enter_context(KeptModes(model))
    estimator, names, count = MinibatchCKA(), None, 0
    try:
        # A child conv is a function call in a graph, not a module: such a graph runs node by node.
        if gm is not None:
            watched.enter_context(interpreted(gm, _ConvInterpreter(gm, record)))
        from tqdm.auto import tqdm

        model.eval()
        generator = torch.Generator().manual_seed(seed)
        # DataLoaders shuffle with the global RNG: seed it, and leave the caller's RNG as it was.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            stream, expected = _stream(data, images, batch_size, generator)
            with tqdm(total=expected, desc="cka", unit="img", disable=not progress, leave=False) as bar:
                for x in _batches(stream, images, batch_size):
                    if len(x) < 4:  # only ever the sole batch: _batches merges short remainders
                        raise CKAError(f"data gave {len(x)} images; the unbiased HSIC needs at least 4")
                    grams.clear()
                    x = x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
                    model(x)
                    if names is None:
                        names = list(grams)
                    elif list(grams) != names:
                        raise CKAError(f"the convs that ran changed between batches ({names} then {list(grams)}): "
                                       f"CKA needs every layer's output for every image")
                    estimator.update_grams([grams[n] for n in names])
                    count += len(x)
                    bar.update(len(x))
    finally:
        watched.close()
        for h in hooks:
            h.remove()
    if names is None:
        raise CKAError("data gave no images; pass a tensor [N, C, H, W] or a non-empty DataLoader")
    if wanted is not None:
        missing = [n for n in wanted if n not in names]
        if missing:
            raise CKAError(f"conv(s) {missing} did not run in the model's forward: they have no output to compare")
    return LayerSimilarity(names, estimator.matrix(), pool, count)


__all__ = ["CKAError", "LayerSimilarity", "MinibatchCKA", "gram", "layer_similarity", "linear_cka", "stages",
           "unbiased_cka", "unbiased_hsic"]
