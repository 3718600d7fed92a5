"""The transformed model as a pure function of (parent kernels, params, buffers, x), under torch.func."""
from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

import kdna_fx
from kdna_fx.testing import TinyResNet, randomize_adapters


def _setup():
    torch.manual_seed(0)
    kmodel = kdna_fx.transform(TinyResNet())
    randomize_adapters(kmodel)
    return kmodel.eval(), kdna_fx.as_function(kmodel.eval())


def test_each_parent_kernel_is_one_input(dtype, tol):
    kmodel, fn = _setup()
    assert set(fn.parents) == {"layer1.0.conv1.weight", "layer2.0.conv2.weight"}
    assert not set(fn.parents) & set(fn.params)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fn(fn.parents, fn.params, fn.buffers, x), kmodel(x), **tol)


@pytest.mark.parametrize("dtype", [torch.float64], indirect=True)
def test_grad_with_respect_to_a_parent_matches_finite_differences(dtype):
    """torch.func's gradient of the tied kernel (used by its parent conv and 3 children) against central
    differences of the function itself, along random directions: no autograd in the oracle."""
    _, fn = _setup()
    name = "layer1.0.conv1.weight"
    x = torch.randn(1, 3, 8, 8)

    def loss(kernel):
        return fn({**fn.parents, name: kernel}, fn.params, fn.buffers, x).square().sum()

    kernel = fn.parents[name].detach()
    analytic = grad(loss)(kernel)
    eps = 1e-6
    for _ in range(12):
        v = torch.randn_like(kernel)
        numeric = (loss(kernel + eps * v) - loss(kernel - eps * v)) / (2 * eps)
        torch.testing.assert_close((analytic * v).sum(), numeric, rtol=1e-6, atol=1e-8)


def test_vmap_over_a_stack_of_parent_kernels(dtype, tol):
    kmodel, fn = _setup()
    x = torch.randn(2, 3, 16, 16)
    name = "layer1.0.conv1.weight"
    stack = torch.stack([fn.parents[name] * s for s in (0.5, 1.0, 2.0)])

    def run(kernel):
        return fn({**fn.parents, name: kernel}, fn.params, fn.buffers, x)

    batched = vmap(run)(stack)
    for i in range(3):
        torch.testing.assert_close(batched[i], run(stack[i]), **tol)
    torch.testing.assert_close(batched[1], kmodel(x), **tol)
