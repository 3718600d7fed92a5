"""Small models and helpers for testing kdna_fx (and for users' own property tests)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import Gate, adapter_parameters
from .errors import KDNAError
from .datamodel import children, record_of


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, padding_mode: str = "zeros", dims: int = 2):
        super().__init__()
        conv, norm = _CONV[dims], _NORM[dims]
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False, padding_mode=padding_mode)
        self.bn1 = norm(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False, padding_mode=padding_mode)
        self.bn2 = norm(cout)
        self.down = (nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


class TinyResNet(nn.Module):
    """A two-stage ResNet small enough for property tests and quick compiles; ``dims`` 1 makes it a 1-D ResNet
    of signals [B, C, L] (ECG-style), 3 a 3-D one of volumes or clips [B, C, D, H, W]."""

    def __init__(self, width: int = 8, in_chans: int = 3, num_classes: int = 5, padding_mode: str = "zeros",
                 dims: int = 2):
        super().__init__()
        self.pool = _POOL[dims]
        self.stem = nn.Sequential(_CONV[dims](in_chans, width, 3, 1, 1, bias=False), _NORM[dims](width), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1, padding_mode, dims),
                                    BasicBlock(width, width, 1, padding_mode, dims))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2, padding_mode, dims),
                                    BasicBlock(2 * width, 2 * width, 1, padding_mode, dims))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(self.pool(x, 1), 1))


class OneFamily(nn.Module):
    """The smallest model with every part of a child's graph, in 1-D, 2-D or 3-D: a stem with a BatchNorm, one
    family (three same-shaped convs: a parent and two children, a residual around them) and a head. Inductor
    builds each fused kernel in C++, about 1 s each on a 2-core machine, so compile tests use it: a TinyResNet
    has two families and about three times the kernels, none of them ours."""

    def __init__(self, dims: int = 2, width: int = 4, in_chans: int = 3, num_classes: int = 5):
        super().__init__()
        self.pool = _POOL[dims]
        self.stem = nn.Sequential(_CONV[dims](in_chans, width, 3, 1, 1, bias=False), _NORM[dims](width), nn.ReLU())
        self.convs = nn.ModuleList(_CONV[dims](width, width, 3, 1, 1) for _ in range(3))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = y = self.stem(x)
        for conv in self.convs:
            y = torch.tanh(conv(y))
        return self.head(torch.flatten(self.pool(x + y, 1), 1))


@dataclass(frozen=True)
class ConvSpec:
    """One conv of a ConvStack: any geometry nn.Conv2d supports, channels kept fixed along the stack."""

    kernel: int = 3
    stride: int = 1
    padding: int | str = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    padding_mode: str = "zeros"


class ConvStack(nn.Module):
    """Convs of identical (C, C, k, groups, dilation, padding_mode) families, each followed by tanh.

    A residual edge reads every conv's input too, so a gate that leaked onto that tensor would show.
    Size-preserving convs (stride 1) add their input; the others add its spatial mean.
    """

    def __init__(self, channels: int, specs: Sequence[ConvSpec]):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, s.kernel, s.stride, s.padding, s.dilation,
                                             s.groups, s.bias, s.padding_mode) for s in specs)
        self.keeps_size = [s.stride == 1 and s.padding in ("same", s.dilation * (s.kernel - 1) // 2) for s in specs]

    def forward(self, x: Tensor) -> Tensor:
        for conv, keeps_size in zip(self.convs, self.keeps_size):
            y = torch.tanh(conv(x))
            x = y + (x if keeps_size else x.mean(dim=(2, 3), keepdim=True))
        return x


class FunctionalConvNet(nn.Module):
    """Convs written as F.conv2d calls on parameters (no nn.Conv2d), with a residual."""

    def __init__(self, channels: int = 4, n: int = 3):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.2) for _ in range(n))
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        for i, w in enumerate(self.weights):
            x = x + torch.tanh(F.conv2d(x, w, self.bias if i == 0 else None, padding=1))
        return x


def randomize_adapters(model: nn.Module, scale: float = 0.3, generator: torch.Generator | None = None) -> None:
    """Give every adapter parameter (F, S, gate weights and biases) random, non-trivial values, and every gate
    BatchNorm random running statistics (so that eval mode and folding see non-trivial ones)."""
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
        for module in model.modules():
            if isinstance(module, Gate) and isinstance(module.norm, nn.BatchNorm1d):
                stats = module.norm
                stats.running_mean.copy_(torch.randn(stats.running_mean.shape, generator=generator) * scale)
                stats.running_var.copy_(torch.rand(stats.running_var.shape, generator=generator) + 0.5)


def untie_parents(kmodel: nn.Module) -> tuple[nn.Module, dict[str, list[str]]]:
    """A copy of a transformed model in which every child reads its own copy of its parent's kernel.

    Returns the copy and, for each parent weight name, the names of the untied copies. Used to check
    that the tied kernel's gradient is the sum of the gradients through all of its users.
    """
    import copy

    kmodel = copy.deepcopy(kmodel)
    plan = record_of(kmodel).plan
    copies: dict[str, list[str]] = {}
    for path, child, parent in list(children(kmodel)):
        family = plan.family_of(path)
        if parent is None or family is None or family.self_adapted:
            continue
        holder = nn.Module()
        holder.weight = nn.Parameter(parent.weight.detach().clone())
        untied = f"untied_{path.replace('.', '_')}"
        kmodel.add_module(untied, holder)
        child.bind(holder)
        copies.setdefault(plan.parent_weight(family), []).append(f"{untied}.weight")
    return kmodel, copies


@dataclass
class GradientCheck:
    """One compiled training step's gradients against eager float64 (``check_compiled_gradients``)."""

    backend: str
    ok: bool
    worst: str
    """The parameter whose compiled gradient is furthest past its bound (see check_compiled_gradients)."""
    error: float
    """That parameter's largest absolute error, compiled float32 against eager float64."""
    eager_error: float
    """The same parameter's error for eager float32: the rounding a right backend cannot beat."""
    scale: float
    """That gradient's largest absolute value (float64)."""

    def __str__(self) -> str:
        verdict = "matches eager" if self.ok else "DIFFERS from eager"
        return (f"compiled gradients ({self.backend}) {verdict}: worst {self.worst!r}, error {self.error:.3g} "
                f"(eager float32: {self.eager_error:.3g}, gradient scale {self.scale:.3g})")


def check_compiled_gradients(model: nn.Module, example_inputs: tuple, *, backend: str | Callable = "inductor",
                             loss: Callable[[object], Tensor] | None = None, tolerance: float = 10.0,
                             rtol: float | None = None) -> GradientCheck:
    """Compare one training step of ``torch.compile(model, backend=backend)`` with eager float64.

    Three deep copies of ``model`` (which itself is not touched) run forward and backward on ``example_inputs``
    (a tuple of positional arguments) in the model's current mode: compiled, eager in the model's dtype, and
    eager float64. ``loss`` maps the output to a scalar (default: the mean square of every floating-point output
    tensor). A parameter is wrong when its compiled gradient is further from float64 than both ``tolerance``
    times eager's own error and ``rtol`` times the gradient's largest value (by default 1e-4 in float32, 1e-9 in
    float64, 1e-2 in half precision: a fused kernel sums in another order); the result names the worst one.
    Random ops (dropout) draw the same numbers in every copy (Inductor's ``fallback_random``).
    """
    import copy

    from torch._inductor import config as inductor_config

    loss = loss or (lambda out: torch.stack([t.float().square().mean() for t in output_tensors(out)]).sum())

    def grads(m: nn.Module, inputs: tuple, compile_with: str | Callable | None = None) -> dict[str, Tensor]:
        run = torch.compile(m, backend=compile_with) if compile_with else m
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            loss(run(*inputs)).backward()
        return {n: p.grad.detach().double() for n, p in m.named_parameters() if p.grad is not None}

    def cast(t: object, dtype: torch.dtype) -> object:
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

    reference = grads(copy.deepcopy(model).double(), tuple(cast(x, torch.float64) for x in example_inputs))
    eager = grads(copy.deepcopy(model), example_inputs)
    with inductor_config.patch(fallback_random=True):
        compiled = grads(copy.deepcopy(model), example_inputs, compile_with=backend)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    rtol = rtol if rtol is not None else {torch.float32: 1e-4, torch.float64: 1e-9}.get(dtype, 1e-2)
    rows = []  # (how far past its bound, name, error, eager error, scale) per parameter
    for name, g in reference.items():
        scale = float(g.abs().max())
        error = float((compiled[name] - g).abs().max()) if name in compiled else float("inf")
        eager_error = float((eager[name] - g).abs().max())
        rows.append((error / max(tolerance * eager_error, rtol * scale, 1e-30), name, error, eager_error, scale))
    if not rows:
        raise KDNAError("check_compiled_gradients: no parameter of the model got a gradient; pass inputs and a loss "
                        "that reach its parameters")
    badness, worst, error, eager_error, scale = max(rows)
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
    return GradientCheck(name, badness <= 1.0, worst, error, eager_error, scale)


def output_tensors(out: object) -> list[torch.Tensor]:
    """Every floating-point tensor of a model's output, in order: tensors, tuples, lists, dicts and dict-like
    outputs (Hugging Face's ModelOutput); for comparing models whose outputs are structures."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "keys") and hasattr(out, "__getitem__"):
        return [t for k in out.keys() for t in output_tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in output_tensors(item)]
    return []


_BLOB_CENTRES = [(4, 4), (4, 12), (12, 4), (12, 12), (8, 8)]  # class = where the bright blob sits


def _blobs(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """16x16 one-channel noise with a bright 4x4 blob in one of 5 places (jittered); the class is the place."""
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.5
    jitter = torch.randint(-2, 3, (n, 2), generator=g)
    for i in range(n):
        r, c = _BLOB_CENTRES[int(y[i])]
        r, c = r + int(jitter[i, 0]), c + int(jitter[i, 1])
        x[i, 0, max(0, r - 2):r + 2, max(0, c - 2):c + 2] += 2.0
    return x, y


def blob_task() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """(a TinyResNet trained 60 steps to tell where a bright blob sits in noise, 256 calibration images, 512
    held-out images, their labels): the small trained model of the calibration and conversion tests and of
    bench/conversion_tiny.py (about 2 s)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TinyResNet(width=8, in_chans=1, num_classes=5)
    x, y = _blobs(512, g)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    test_x, test_y = _blobs(512, g)
    calib_x, _ = _blobs(256, g)
    return model, calib_x, test_x, test_y


__all__ = ["BasicBlock", "ConvSpec", "ConvStack", "FunctionalConvNet", "GradientCheck", "OneFamily", "TinyResNet",
           "blob_task", "check_compiled_gradients", "output_tensors", "randomize_adapters", "untie_parents"]


def write_tiny_fashion_mnist(root: str | os.PathLike[str], n_train: int = 6, n_test: int = 4, seed: int = 0) -> None:
    """Random 28x28 images and labels 0-9 in ``root``, in the file names and gzip/IDX layout of the Debian
    package: a Fashion-MNIST stand-in for tests and smoke runs (``--data root``)."""
    import numpy as np

    from .data import write_idx

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"),
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), rng.integers(0, 10, n, dtype=np.uint8))
