"""Linear CKA of feature matrices: the exact estimator, the unbiased HSIC of Gram matrices, and the minibatch
CKA (Nguyen, Raghu & Kornblith 2021) that accumulates it over batches. Everything in float64."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from kdna_fx.errors import CKAError

# Columns of features turned into a Gram matrix at once: bounds the float64 copy of a large feature map.
_GRAM_CHUNK = 1 << 16


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
